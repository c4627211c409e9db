/*
 * lockwarden — the libvirt lock-driver plugin ABI, as libvirt 9.x lays it out on LP64.
 *
 * Written for lockwarden from the documented facts (docs: shared/docs/libvirt-lock-driver.md,
 * sections 1.2 and 1.3). libvirt does not install its own header, so this file is our
 * contract: build.rs feeds it to bindgen for the Rust types and the C test host includes it.
 * The static asserts below fail the build if a field ever moves.
 */
#ifndef LOCKWARDEN_LOCK_DRIVER_H
#define LOCKWARDEN_LOCK_DRIVER_H

#include <stddef.h>

/* Version handed to drvInit and stored in the driver struct: MAJOR*1e6 + MINOR*1e3 + MICRO. */
#define VIR_LOCK_MANAGER_VERSION_MAJOR 1
#define VIR_LOCK_MANAGER_VERSION_MINOR 0
#define VIR_LOCK_MANAGER_VERSION_MICRO 0
#define VIR_LOCK_MANAGER_VERSION 1000000

/* Driver-level flags (virLockDriver.flags). */
typedef enum {
    VIR_LOCK_MANAGER_USES_STATE = (1 << 0),
} virLockManagerFlags;

/* Object types accepted by drvNew. */
typedef enum {
    VIR_LOCK_MANAGER_OBJECT_TYPE_DOMAIN = 0,
} virLockManagerObjectType;

/* Resource types accepted by drvAddResource. */
typedef enum {
    VIR_LOCK_MANAGER_RESOURCE_TYPE_DISK = 0,
    VIR_LOCK_MANAGER_RESOURCE_TYPE_LEASE = 1,
} virLockManagerResourceType;

/* drvAddResource flags. */
typedef enum {
    VIR_LOCK_MANAGER_RESOURCE_READONLY = (1 << 0),
    VIR_LOCK_MANAGER_RESOURCE_SHARED = (1 << 1),
} virLockManagerResourceFlags;

/* drvAcquire flags. */
typedef enum {
    VIR_LOCK_MANAGER_ACQUIRE_REGISTER_ONLY = (1 << 0),
    VIR_LOCK_MANAGER_ACQUIRE_RESTRICT = (1 << 1),
} virLockManagerAcquireFlags;

/* drvNew flags. */
typedef enum {
    VIR_LOCK_MANAGER_NEW_STARTED = (1 << 0),
} virLockManagerNewFlags;

/* Type tag of a virLockManagerParam value. */
typedef enum {
    VIR_LOCK_MANAGER_PARAM_TYPE_STRING = 0,
    VIR_LOCK_MANAGER_PARAM_TYPE_CSTRING = 1,
    VIR_LOCK_MANAGER_PARAM_TYPE_INT = 2,
    VIR_LOCK_MANAGER_PARAM_TYPE_LONG = 3,
    VIR_LOCK_MANAGER_PARAM_TYPE_UINT = 4,
    VIR_LOCK_MANAGER_PARAM_TYPE_ULONG = 5,
    VIR_LOCK_MANAGER_PARAM_TYPE_DOUBLE = 6,
    VIR_LOCK_MANAGER_PARAM_TYPE_UUID = 7,
} virLockManagerParamType;

/* The domain's <on_lockfailure> policy, passed to drvAcquire. A plain C enum: 4 bytes. */
typedef enum {
    VIR_DOMAIN_LOCK_FAILURE_DEFAULT = 0,
    VIR_DOMAIN_LOCK_FAILURE_POWEROFF = 1,
    VIR_DOMAIN_LOCK_FAILURE_RESTART = 2,
    VIR_DOMAIN_LOCK_FAILURE_PAUSE = 3,
    VIR_DOMAIN_LOCK_FAILURE_IGNORE = 4,
    VIR_DOMAIN_LOCK_FAILURE_LAST = 5,
} virDomainLockFailureAction;

/* Raw UUID length (bytes, not text). */
#define VIR_UUID_BUFLEN 16

typedef struct _virLockManagerParam virLockManagerParam;
struct _virLockManagerParam {
    int type;        /* virLockManagerParamType */
    const char *key;
    union {
        int iv;
        long long l;
        unsigned int ui;
        unsigned long long ul;
        double d;
        char *str;
        const char *cstr;
        unsigned char uuid[VIR_UUID_BUFLEN];
    } value;
};

typedef struct _virLockDriver virLockDriver;

typedef struct _virLockManager virLockManager;
struct _virLockManager {
    virLockDriver *driver; /* set by libvirt */
    void *privateData;     /* owned by the plugin */
};

typedef int (*virLockDriverInit)(unsigned int version, const char *configFile,
                                 unsigned int flags);
typedef int (*virLockDriverDeinit)(void);
typedef int (*virLockDriverNew)(virLockManager *man, unsigned int type, size_t nparams,
                                virLockManagerParam *params, unsigned int flags);
typedef void (*virLockDriverFree)(virLockManager *man);
typedef int (*virLockDriverAddResource)(virLockManager *man, unsigned int type,
                                        const char *name, size_t nparams,
                                        virLockManagerParam *params, unsigned int flags);
typedef int (*virLockDriverAcquire)(virLockManager *man, const char *state, unsigned int flags,
                                    virDomainLockFailureAction action, int *fd);
typedef int (*virLockDriverRelease)(virLockManager *man, char **state, unsigned int flags);
typedef int (*virLockDriverInquire)(virLockManager *man, char **state, unsigned int flags);

struct _virLockDriver {
    unsigned int version;
    unsigned int flags;
    virLockDriverInit drvInit;
    virLockDriverDeinit drvDeinit;
    virLockDriverNew drvNew;
    virLockDriverFree drvFree;
    virLockDriverAddResource drvAddResource;
    virLockDriverAcquire drvAcquire;
    virLockDriverRelease drvRelease;
    virLockDriverInquire drvInquire;
};

/* libvirt error numbers the plugin raises (virerror.h; public values). */
#define VIR_FROM_LOCKING 42
#define VIR_ERR_INTERNAL_ERROR 1
#define VIR_ERR_OPERATION_DENIED 29
#define VIR_ERR_SYSTEM_ERROR 38
#define VIR_ERR_OPERATION_INVALID 55
#define VIR_ERR_CONFIG_UNSUPPORTED 67
#define VIR_ERR_RESOURCE_BUSY 87

/* virReportErrorHelper(domcode, errcode, filename, funcname, linenr, fmt, ...): resolved at run
 * time with dlsym(RTLD_DEFAULT, ...) because it lives in a release-pinned private symbol node. */
typedef void (*virReportErrorHelperFn)(int domcode, int errcode, const char *filename,
                                       const char *funcname, size_t linenr, const char *fmt, ...);

/* Layout checks (x86_64 / LP64). */
_Static_assert(sizeof(struct _virLockDriver) == 72, "virLockDriver must be 72 bytes");
_Static_assert(offsetof(struct _virLockDriver, version) == 0, "version at 0");
_Static_assert(offsetof(struct _virLockDriver, flags) == 4, "flags at 4");
_Static_assert(offsetof(struct _virLockDriver, drvInit) == 8, "drvInit at 8");
_Static_assert(offsetof(struct _virLockDriver, drvDeinit) == 16, "drvDeinit at 16");
_Static_assert(offsetof(struct _virLockDriver, drvNew) == 24, "drvNew at 24");
_Static_assert(offsetof(struct _virLockDriver, drvFree) == 32, "drvFree at 32");
_Static_assert(offsetof(struct _virLockDriver, drvAddResource) == 40, "drvAddResource at 40");
_Static_assert(offsetof(struct _virLockDriver, drvAcquire) == 48, "drvAcquire at 48");
_Static_assert(offsetof(struct _virLockDriver, drvRelease) == 56, "drvRelease at 56");
_Static_assert(offsetof(struct _virLockDriver, drvInquire) == 64, "drvInquire at 64");
_Static_assert(sizeof(struct _virLockManager) == 16, "virLockManager must be 16 bytes");
_Static_assert(offsetof(struct _virLockManager, privateData) == 8, "privateData at 8");
_Static_assert(sizeof(struct _virLockManagerParam) == 32, "virLockManagerParam must be 32 bytes");
_Static_assert(offsetof(struct _virLockManagerParam, key) == 8, "key at 8");
_Static_assert(offsetof(struct _virLockManagerParam, value) == 16, "value at 16");
_Static_assert(sizeof(virDomainLockFailureAction) == 4, "enum is an int");

#endif /* LOCKWARDEN_LOCK_DRIVER_H */
