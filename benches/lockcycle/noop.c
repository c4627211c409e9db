/*
 * A lock-driver plugin that locks nothing: the ceiling of the C test host for the throughput
 * rows (docs/benchmarks.md, "Issue 17"). Every callback succeeds at once. The one thing it
 * must still do is what the host checks of any plugin (tests/c/host.c, header): a
 * REGISTER_ONLY acquire hands back an open, inheritable descriptor (here /dev/null, standing
 * for the lifetime connection a real plugin returns), and Release/Inquire set *state to NULL.
 * Layout and signatures: include/lockwarden/lock_driver.h (docs/interfaces.md).
 */
#include <fcntl.h>
#include <stddef.h>

#include "lockwarden/lock_driver.h"

static int noop_init(unsigned int version, const char *config, unsigned int flags)
{
    (void)version;
    (void)config;
    (void)flags;
    return 0;
}

static int noop_deinit(void)
{
    return 0;
}

static int noop_new(virLockManager *man, unsigned int type, size_t nparams,
                    virLockManagerParam *params, unsigned int flags)
{
    (void)man;
    (void)type;
    (void)nparams;
    (void)params;
    (void)flags;
    return 0;
}

static void noop_free(virLockManager *man)
{
    (void)man;
}

static int noop_add(virLockManager *man, unsigned int type, const char *name, size_t nparams,
                    virLockManagerParam *params, unsigned int flags)
{
    (void)man;
    (void)type;
    (void)name;
    (void)nparams;
    (void)params;
    (void)flags;
    return 0;
}

static int noop_acquire(virLockManager *man, const char *state, unsigned int flags,
                        virDomainLockFailureAction action, int *fd)
{
    (void)man;
    (void)state;
    (void)flags;
    (void)action;
    /* libvirt passes fd only when the owner process registers (start): it keeps it. */
    if (fd) {
        /* Not O_CLOEXEC: the owner keeps it across exec, as it keeps a real lifetime fd. */
        *fd = open("/dev/null", O_RDONLY);
        if (*fd < 0)
            return -1;
    }
    return 0;
}

static int noop_state(virLockManager *man, char **state, unsigned int flags)
{
    (void)man;
    (void)flags;
    if (state)
        *state = NULL;
    return 0;
}

virLockDriver virLockDriverImpl = {
    .version = VIR_LOCK_MANAGER_VERSION,
    .flags = 0,
    .drvInit = noop_init,
    .drvDeinit = noop_deinit,
    .drvNew = noop_new,
    .drvFree = noop_free,
    .drvAddResource = noop_add,
    .drvAcquire = noop_acquire,
    .drvRelease = noop_state,
    .drvInquire = noop_state,
};
