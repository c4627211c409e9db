/*
 * LD_PRELOAD shim for the lockd side of the benchmark: calls libvirt's virInitialize() before
 * the C test host's main(), as libvirtd does at startup. Without it libvirt's thread-local error
 * slot key is never created, and the first error libvirt records inside lockd.so (even an
 * internal, later-cleared one) frees a pointer that belongs to another library and aborts.
 * dlopen/dlsym instead of -lvirt: no libvirt-dev needed, and RTLD_GLOBAL|RTLD_NOW loads the same
 * libvirt.so.0 instance that lockd.so links against later.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

__attribute__((constructor)) static void lockcycle_virinit(void)
{
    void *h = dlopen("libvirt.so.0", RTLD_NOW | RTLD_GLOBAL);
    int (*init)(void) = h ? (int (*)(void))dlsym(h, "virInitialize") : NULL;
    if (!init || init() < 0) {
        fprintf(stderr, "virinit shim: cannot initialise libvirt.so.0: %s\n",
                h ? "virInitialize failed" : dlerror());
        exit(1);
    }
}
