/*
 * lockwarden-test-host: loads a libvirt lock-driver plugin exactly as libvirt's loader does and
 * replays libvirt's call sequences, driven by commands on stdin. Tests (and other helpers) talk
 * to it through this command language; keep it stable.
 *
 * Invocation:  lockwarden-test-host PLUGIN.so CONFIG_FILE [--no-init]
 *   dlopen(PLUGIN, RTLD_NOW|RTLD_LOCAL), dlsym("virLockDriverImpl"), then
 *   drvInit(1000000, CONFIG_FILE, 0) (CONFIG_FILE "@null" passes NULL; a file that does not
 *   exist means defaults). Prints "READY" on success, or "ERR <code> <domain> <message>" and
 *   exits 1. With --no-init, drvInit is not called (use raw-init) and READY is printed.
 *   This program exports its own virReportErrorHelper (linked -rdynamic), which records the
 *   error the plugin raises, as libvirt's would.
 *
 * Protocol: one command per line on stdin, exactly one reply line per command on stdout
 * (flushed). Tokens are separated by single spaces; inside a token "%XX" is a hex-escaped byte
 * (so a space is %20, a newline %0A, a colon inside a RES field %3A, a percent sign %25; %00
 * ends the C string there, so the token "%00" passes an empty string).
 * Replies: "OK [extra]" or "ERR <code> <domain> <message>" with newlines in the message written
 * as the two characters \n. code/domain are the libvirt error the plugin raised. The host also
 * checks the plugin's side of the contract and answers "ERR 0 0 host: ..." when the plugin
 * returned -1 without raising an error, returned 0 but raised one, left *fd set after a failed
 * Acquire, left privateData set after a failed New, or returned a non-NULL state string where
 * none is expected.
 *
 * RES tokens (resources for AddResource):
 *   disk:PATH                      DISK, flags 0                  (PATH may contain ':')
 *   disk-ro:PATH                   DISK, READONLY
 *   disk-shared:PATH               DISK, SHARED
 *   lease:KEY:PATH:OFFSET[:LS]     LEASE named KEY, params path STRING, offset ULONG and, when
 *                                  LS is given, lockspace STRING (fields are split at ':' first,
 *                                  then %-decoded)
 *   disk-null                      DISK with a NULL name
 *   res:TYPE:FLAGS:NAME            any resource type and flags (numbers, 0x.. allowed), no
 *                                  params; NAME "@null" = NULL
 *
 * libvirt call sequences (NAME = domain name, UUID = canonical text, converted to 16 raw bytes;
 * the drvNew params are always uuid UUID, name STRING, id UINT, pid UINT, uri CSTRING):
 *   start NAME UUID ID RES...
 *       Domain start. fork(); the child closes every descriptor but its result pipe (as
 *       libvirt's fork does), calls drvNew(pid=getpid(), uri="qemu:///system", NEW_STARTED),
 *       drvAddResource per RES, drvAcquire(state NULL, REGISTER_ONLY|RESTRICT, DEFAULT, &fd),
 *       drvFree, checks the fd is open and inheritable, reports through the pipe and on success
 *       execs "/bin/sleep 1000000" keeping fd (it stands for QEMU; stdio is /dev/null).
 *       Reply: "OK <childpid>" or "ERR ..." (the child exits 125, and is reaped).
 *   start-running NAME UUID ID GATE RES...
 *       libvirt's not-paused start (virDomainLockProcessStart with paused = false): as start,
 *       but the child calls drvAcquire(state NULL, RESTRICT, DEFAULT, &fd), taking the disks
 *       itself on the connection it keeps. It then execs /bin/sh, which waits while the file
 *       GATE exists, then closes the lifetime fd and execs "/bin/sleep 1000000": removing GATE
 *       closes the handle while the "QEMU" keeps running. Reply as for start.
 *   acquire NAME UUID ID PID RES...
 *       CPU start / resume / hot-plug from the daemon: drvNew(flags 0, pid=PID,
 *       uri="qemu:///system"), drvAddResource per RES, drvAcquire(NULL, 0, DEFAULT, NULL),
 *       drvFree. "OK" or "ERR ...".
 *   acquire-action ACTION NAME UUID ID PID RES...
 *       The same with ACTION one of default|poweroff|restart|pause|ignore (or a number).
 *   release NAME UUID ID PID RES...
 *       Pause / unplug: drvNew(flags 0, uri NULL), drvAddResource per RES,
 *       drvRelease(&state, 0), drvFree. "OK" (the state must come back NULL).
 *   release-nostate NAME UUID ID PID RES...
 *       The same with drvRelease(NULL, 0) (libvirt's detach paths).
 *   inquire NAME UUID ID PID RES...
 *       drvNew(uri NULL), drvAddResource per RES, drvInquire(&state, 0), drvFree.
 *       "OK" or "OK <state>" (%-encoded).
 *   In all of these, a failed drvNew is followed by no drvFree (libvirt frees the manager
 *   itself) and a failed drvAddResource by drvFree, as libvirt does. An error raised by drvFree
 *   is reported when nothing failed before.
 *
 * Processes:
 *   kill PID SIGNAL     kill(2) (SIGNAL: a number or KILL, TERM, INT, HUP, STOP, CONT, USR1,
 *                       USR2); "OK" or "ERR 0 0 kill: <errno text>".
 *   wait PID            waitpid(PID, &st, 0); "OK <st>" with the raw wait status.
 *   alive PID           "OK 1" if PID runs, "OK 0" if not (reaps it if it is our zombie).
 *
 * Raw calls (bad-input tests). One manager slot, "current", used by raw-add / raw-acquire /
 * raw-release / raw-inquire / raw-free; when the slot is empty those get a zeroed manager
 * whose privateData is NULL.
 *   raw-init VERSION FLAGS CONFIG      drvInit(VERSION, CONFIG, FLAGS); CONFIG "@null" = NULL.
 *   raw-new TYPE FLAGS PARAM...        drvNew on a fresh manager (replacing the slot; a previous
 *                                      manager is drvFree'd first). On success it becomes
 *                                      current; on failure it is freed without drvFree.
 *   raw-add TYPE FLAGS NAME PARAM...   drvAddResource(current, TYPE, NAME, params, FLAGS);
 *                                      NAME "@null" = NULL.
 *   raw-acquire FLAGS ACTION STATE FDMODE
 *                                      drvAcquire(current, STATE ("@null" = NULL), FLAGS, ACTION,
 *                                      FDMODE "fd" = &fd | "nofd" = NULL). Reply "OK" or, with
 *                                      fd, "OK fd=<n> cloexec=<0|1>" (the host keeps the fd open
 *                                      until "close").
 *   raw-release FLAGS STATEMODE        drvRelease(current, "state" = &state | "nostate" = NULL,
 *                                      FLAGS). "OK" or "OK state=<s>".
 *   raw-inquire FLAGS STATEMODE        drvInquire likewise.
 *   raw-free                           drvFree(current) then the host frees the manager.
 *   raw-null-man OP                    OP (new|add|acquire|release|inquire|free) with man = NULL.
 *   PARAM tokens:  KEY:TYPE:VALUE with TYPE string|cstring|int|long|uint|ulong|double|uuid or a
 *                  number (the value is then ignored and the union zeroed); KEY "@null" = NULL
 *                  key; for string/cstring VALUE "@null" = NULL. Split at the first two ':'s,
 *                  then %-decoded. The token "@nullparams:N" passes params = NULL, nparams = N.
 *
 * Miscellaneous:
 *   layout        "OK size=<st_size of virLockDriverImpl> version=<v> flags=<f> fns=<non-NULL
 *                 function pointers>" (size from the ELF symbol table via dladdr1).
 *   fdcount       "OK <number of open descriptors in the host>".
 *   close FD      close(FD); "OK".
 *   deinit        drvDeinit(); "OK <rc>".
 *   quit          exit 0 (end of input does the same).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lockwarden/lock_driver.h"

#define MAX_TOKENS 4096
#define MAX_PARAMS 64
#define MSG_MAX 16384

static virLockDriver *drv;

/* ---- the error libvirt would record -------------------------------------------------------- */

struct err {
    int set;
    int code;
    int domain;
    char msg[MSG_MAX];
};

static struct err last;

void virReportErrorHelper(int domcode, int errcode, const char *filename, const char *funcname,
                          size_t linenr, const char *fmt, ...)
{
    va_list ap;
    (void)filename;
    (void)funcname;
    (void)linenr;
    last.set = 1;
    last.code = errcode;
    last.domain = domcode;
    va_start(ap, fmt);
    vsnprintf(last.msg, sizeof(last.msg), fmt, ap);
    va_end(ap);
}

/* ---- output -------------------------------------------------------------------------------- */

static void put_escaped_msg(FILE *out, const char *msg)
{
    for (const char *p = msg; *p; p++) {
        if (*p == '\n')
            fputs("\\n", out);
        else if (*p == '\r')
            fputs("\\r", out);
        else
            fputc(*p, out);
    }
}

static void reply_err_to(FILE *out, int code, int domain, const char *msg)
{
    fprintf(out, "ERR %d %d ", code, domain);
    put_escaped_msg(out, msg);
    fputc('\n', out);
    fflush(out);
}

static void reply_err(const struct err *e)
{
    reply_err_to(stdout, e->code, e->domain, e->msg);
}

static void reply_host_err(const char *fmt, ...)
{
    char buf[MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    reply_err_to(stdout, 0, 0, buf);
}

static void reply_ok(const char *fmt, ...)
{
    fputs("OK", stdout);
    if (fmt) {
        va_list ap;
        fputc(' ', stdout);
        va_start(ap, fmt);
        vfprintf(stdout, fmt, ap);
        va_end(ap);
    }
    fputc('\n', stdout);
    fflush(stdout);
}

/* %-encode a string for a reply (spaces, newlines, '%' and non-printables escaped). */
static void put_encoded(FILE *out, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p <= ' ' || *p == '%' || *p >= 0x7f)
            fprintf(out, "%%%02X", *p);
        else
            fputc(*p, out);
    }
}

/* ---- parsing ------------------------------------------------------------------------------- */

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decode %XX escapes in place. */
static void decode(char *s)
{
    char *w = s;
    for (char *r = s; *r; r++) {
        if (r[0] == '%' && hexval(r[1]) >= 0 && hexval(r[2]) >= 0) {
            *w++ = (char)(hexval(r[1]) * 16 + hexval(r[2]));
            r += 2;
        } else {
            *w++ = *r;
        }
    }
    *w = '\0';
}

static int is_null_token(const char *s)
{
    return strcmp(s, "@null") == 0;
}

static int parse_ull(const char *s, unsigned long long *out)
{
    char *end;
    if (!*s)
        return -1;
    errno = 0;
    *out = strtoull(s, &end, 0);
    return (errno || *end) ? -1 : 0;
}

static int parse_ll(const char *s, long long *out)
{
    char *end;
    if (!*s)
        return -1;
    errno = 0;
    *out = strtoll(s, &end, 0);
    return (errno || *end) ? -1 : 0;
}

static int parse_uuid(const char *s, unsigned char out[VIR_UUID_BUFLEN])
{
    int n = 0;
    for (const char *p = s; *p; p++) {
        if (*p == '-')
            continue;
        if (n >= 2 * VIR_UUID_BUFLEN || hexval(p[0]) < 0 || hexval(p[1]) < 0)
            return -1;
        out[n / 2] = (unsigned char)(hexval(p[0]) * 16 + hexval(p[1]));
        n += 2;
        p++;
    }
    return n == 2 * VIR_UUID_BUFLEN ? 0 : -1;
}

static int parse_action(const char *s, virDomainLockFailureAction *out)
{
    static const char *names[] = {"default", "poweroff", "restart", "pause", "ignore"};
    unsigned long long n;
    for (int i = 0; i < 5; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = (virDomainLockFailureAction)i;
            return 0;
        }
    }
    if (parse_ull(s, &n) == 0 && n <= 0xffffffffULL) {
        *out = (virDomainLockFailureAction)n;
        return 0;
    }
    return -1;
}

/* Split a token at ':' into at most `max` fields (the last keeps further colons). In place. */
static int split_colon(char *s, char **fields, int max)
{
    int n = 0;
    fields[n++] = s;
    while (n < max) {
        char *c = strchr(fields[n - 1], ':');
        if (!c)
            break;
        *c = '\0';
        fields[n++] = c + 1;
    }
    return n;
}

/* A parameter token: KEY:TYPE:VALUE. Returns 0 or -1 (with *why set). */
static int parse_param(char *tok, virLockManagerParam *p, const char **why)
{
    char *f[3];
    memset(p, 0, sizeof(*p));
    if (split_colon(tok, f, 3) != 3) {
        *why = "a PARAM is KEY:TYPE:VALUE";
        return -1;
    }
    decode(f[0]);
    decode(f[2]);
    p->key = is_null_token(f[0]) ? NULL : f[0];
    const char *t = f[1];
    char *v = f[2];
    long long ll;
    unsigned long long ull;
    if (strcmp(t, "string") == 0) {
        p->type = VIR_LOCK_MANAGER_PARAM_TYPE_STRING;
        p->value.str = is_null_token(v) ? NULL : v;
    } else if (strcmp(t, "cstring") == 0) {
        p->type = VIR_LOCK_MANAGER_PARAM_TYPE_CSTRING;
        p->value.cstr = is_null_token(v) ? NULL : v;
    } else if (strcmp(t, "int") == 0) {
        if (parse_ll(v, &ll) < 0) {
            *why = "bad int";
            return -1;
        }
        p->type = VIR_LOCK_MANAGER_PARAM_TYPE_INT;
        p->value.iv = (int)ll;
    } else if (strcmp(t, "long") == 0) {
        if (parse_ll(v, &ll) < 0) {
            *why = "bad long";
            return -1;
        }
        p->type = VIR_LOCK_MANAGER_PARAM_TYPE_LONG;
        p->value.l = ll;
    } else if (strcmp(t, "uint") == 0) {
        if (parse_ull(v, &ull) < 0) {
            *why = "bad uint";
            return -1;
        }
        p->type = VIR_LOCK_MANAGER_PARAM_TYPE_UINT;
        p->value.ui = (unsigned int)ull;
    } else if (strcmp(t, "ulong") == 0) {
        if (parse_ull(v, &ull) < 0) {
            *why = "bad ulong";
            return -1;
        }
        p->type = VIR_LOCK_MANAGER_PARAM_TYPE_ULONG;
        p->value.ul = ull;
    } else if (strcmp(t, "double") == 0) {
        p->type = VIR_LOCK_MANAGER_PARAM_TYPE_DOUBLE;
        p->value.d = strtod(v, NULL);
    } else if (strcmp(t, "uuid") == 0) {
        if (parse_uuid(v, p->value.uuid) < 0) {
            *why = "bad uuid";
            return -1;
        }
        p->type = VIR_LOCK_MANAGER_PARAM_TYPE_UUID;
    } else if (parse_ll(t, &ll) == 0) {
        p->type = (int)ll;
    } else {
        *why = "unknown PARAM type";
        return -1;
    }
    return 0;
}

/* A list of PARAM tokens, or "@nullparams:N". */
struct plist {
    virLockManagerParam v[MAX_PARAMS];
    virLockManagerParam *ptr;
    size_t n;
};

static int parse_params(char **toks, int ntok, struct plist *pl, const char **why)
{
    pl->ptr = pl->v;
    pl->n = 0;
    for (int i = 0; i < ntok; i++) {
        unsigned long long n;
        if (strncmp(toks[i], "@nullparams:", 12) == 0) {
            if (parse_ull(toks[i] + 12, &n) < 0) {
                *why = "bad @nullparams count";
                return -1;
            }
            pl->ptr = NULL;
            pl->n = (size_t)n;
            continue;
        }
        if (pl->n >= MAX_PARAMS) {
            *why = "too many params";
            return -1;
        }
        if (parse_param(toks[i], &pl->v[pl->n], why) < 0)
            return -1;
        pl->n++;
    }
    return 0;
}

/* A RES token. */
struct res {
    unsigned int type;
    const char *name;
    unsigned int flags;
    size_t nparams;
    virLockManagerParam params[3];
};

static int parse_res(char *tok, struct res *r, const char **why)
{
    memset(r, 0, sizeof(*r));
    if (strcmp(tok, "disk-null") == 0) {
        r->type = VIR_LOCK_MANAGER_RESOURCE_TYPE_DISK;
        r->name = NULL;
        return 0;
    }
    char *colon = strchr(tok, ':');
    if (!colon) {
        *why = "a RES is disk:PATH, disk-ro:PATH, disk-shared:PATH, lease:KEY:PATH:OFFSET[:LS], "
               "disk-null or res:TYPE:FLAGS:NAME";
        return -1;
    }
    *colon = '\0';
    char *rest = colon + 1;
    if (strcmp(tok, "disk") == 0 || strcmp(tok, "disk-ro") == 0 ||
        strcmp(tok, "disk-shared") == 0) {
        r->type = VIR_LOCK_MANAGER_RESOURCE_TYPE_DISK;
        if (strcmp(tok, "disk-ro") == 0)
            r->flags = VIR_LOCK_MANAGER_RESOURCE_READONLY;
        else if (strcmp(tok, "disk-shared") == 0)
            r->flags = VIR_LOCK_MANAGER_RESOURCE_SHARED;
        decode(rest);
        r->name = rest;
        return 0;
    }
    if (strcmp(tok, "lease") == 0) {
        char *f[4];
        unsigned long long off;
        int n = split_colon(rest, f, 4);
        if (n < 3) {
            *why = "a lease RES is lease:KEY:PATH:OFFSET[:LOCKSPACE]";
            return -1;
        }
        for (int i = 0; i < n; i++)
            decode(f[i]);
        if (parse_ull(f[2], &off) < 0) {
            *why = "bad lease offset";
            return -1;
        }
        r->type = VIR_LOCK_MANAGER_RESOURCE_TYPE_LEASE;
        r->name = f[0];
        r->params[0].type = VIR_LOCK_MANAGER_PARAM_TYPE_STRING;
        r->params[0].key = "path";
        r->params[0].value.str = f[1];
        r->params[1].type = VIR_LOCK_MANAGER_PARAM_TYPE_ULONG;
        r->params[1].key = "offset";
        r->params[1].value.ul = off;
        r->nparams = 2;
        if (n == 4) {
            r->params[2].type = VIR_LOCK_MANAGER_PARAM_TYPE_STRING;
            r->params[2].key = "lockspace";
            r->params[2].value.str = f[3];
            r->nparams = 3;
        }
        return 0;
    }
    if (strcmp(tok, "res") == 0) {
        char *f[3];
        unsigned long long type, flags;
        if (split_colon(rest, f, 3) != 3 || parse_ull(f[0], &type) < 0 ||
            parse_ull(f[1], &flags) < 0) {
            *why = "a raw RES is res:TYPE:FLAGS:NAME";
            return -1;
        }
        decode(f[2]);
        r->type = (unsigned int)type;
        r->flags = (unsigned int)flags;
        r->name = is_null_token(f[2]) ? NULL : f[2];
        return 0;
    }
    *why = "unknown RES kind";
    return -1;
}

/* ---- calling the plugin with contract checks ----------------------------------------------- */

/* Check one call's outcome; on a contract violation or failure, reply and return -1. */
static int check_call(const char *what, int rc, struct err *saved)
{
    if (rc < 0) {
        if (!last.set) {
            reply_host_err("host: %s returned %d without raising a libvirt error", what, rc);
            return -1;
        }
        *saved = last;
        reply_err(saved);
        return -1;
    }
    if (last.set) {
        reply_host_err("host: %s returned %d but raised an error: %s", what, rc, last.msg);
        return -1;
    }
    return 0;
}

static virLockManager *new_manager(void)
{
    virLockManager *man = calloc(1, sizeof(*man));
    if (!man) {
        perror("calloc");
        exit(2);
    }
    man->driver = drv;
    return man;
}

/* drvFree the way libvirt does, then free the struct. Returns -1 if drvFree raised an error
 * (stored in last). */
static int free_manager(virLockManager *man)
{
    last.set = 0;
    drv->drvFree(man);
    int raised = last.set;
    free(man);
    return raised ? -1 : 0;
}

enum op { OP_START, OP_START_RUNNING, OP_ACQUIRE, OP_RELEASE, OP_RELEASE_NOSTATE, OP_INQUIRE };

/* Both domain-start flavours run in the forked child and return the lifetime fd. */
#define IS_START(op) ((op) == OP_START || (op) == OP_START_RUNNING)

/*
 * The common libvirt sequence: New, AddResource*, the operation, Free. Writes the reply (or,
 * for OP_START in the child, the reply line to `out`). Returns 0 on success.
 * For OP_START, *fd receives the lifetime fd.
 */
static int run_sequence(FILE *out, enum op op, char *name, const char *uuidtxt, const char *idtxt,
                        const char *pidtxt, char **restoks, int nres,
                        virDomainLockFailureAction action, int *fd, char **state_out)
{
    unsigned char uuid[VIR_UUID_BUFLEN];
    unsigned long long id, pid;
    static struct res res[MAX_TOKENS];
    const char *why = NULL;
    virLockManagerParam params[5];
    struct err saved;
    int rc;

    decode(name);
    if (parse_uuid(uuidtxt, uuid) < 0 || parse_ull(idtxt, &id) < 0 ||
        (pidtxt && parse_ull(pidtxt, &pid) < 0)) {
        reply_err_to(out, 0, 0, "host: bad NAME/UUID/ID/PID");
        return -1;
    }
    if (!pidtxt)
        pid = (unsigned long long)getpid();
    for (int i = 0; i < nres; i++) {
        if (parse_res(restoks[i], &res[i], &why) < 0) {
            reply_err_to(out, 0, 0, why);
            return -1;
        }
    }

    memset(params, 0, sizeof(params));
    params[0].type = VIR_LOCK_MANAGER_PARAM_TYPE_UUID;
    params[0].key = "uuid";
    memcpy(params[0].value.uuid, uuid, VIR_UUID_BUFLEN);
    params[1].type = VIR_LOCK_MANAGER_PARAM_TYPE_STRING;
    params[1].key = "name";
    params[1].value.str = name;
    params[2].type = VIR_LOCK_MANAGER_PARAM_TYPE_UINT;
    params[2].key = "id";
    params[2].value.iv = (int)id; /* libvirt writes id and pid through .iv */
    params[3].type = VIR_LOCK_MANAGER_PARAM_TYPE_UINT;
    params[3].key = "pid";
    params[3].value.iv = (int)pid;
    params[4].type = VIR_LOCK_MANAGER_PARAM_TYPE_CSTRING;
    params[4].key = "uri";
    params[4].value.cstr =
        (IS_START(op) || op == OP_ACQUIRE) ? "qemu:///system" : NULL;

    virLockManager *man = new_manager();
    last.set = 0;
    rc = drv->drvNew(man, VIR_LOCK_MANAGER_OBJECT_TYPE_DOMAIN, 5, params,
                     IS_START(op) ? VIR_LOCK_MANAGER_NEW_STARTED : 0);
    if (rc < 0) {
        if (!last.set) {
            reply_err_to(out, 0, 0, "host: drvNew returned -1 without raising a libvirt error");
        } else if (man->privateData) {
            reply_err_to(out, 0, 0, "host: drvNew failed but left privateData set");
        } else {
            reply_err_to(out, last.code, last.domain, last.msg);
        }
        free(man); /* libvirt frees the manager without drvFree */
        return -1;
    }
    if (last.set) {
        reply_err_to(out, 0, 0, "host: drvNew returned 0 but raised an error");
        free_manager(man);
        return -1;
    }

    for (int i = 0; i < nres; i++) {
        last.set = 0;
        rc = drv->drvAddResource(man, res[i].type, res[i].name, res[i].nparams,
                                 res[i].nparams ? res[i].params : NULL, res[i].flags);
        if (rc < 0 || last.set) {
            if (rc < 0 && last.set) {
                saved = last;
            } else {
                saved.code = 0;
                saved.domain = 0;
                snprintf(saved.msg, sizeof(saved.msg), "host: drvAddResource returned %d %s", rc,
                         rc < 0 ? "without raising a libvirt error" : "but raised an error");
            }
            free_manager(man);
            reply_err_to(out, saved.code, saved.domain, saved.msg);
            return -1;
        }
    }

    char *state = NULL;
    const char *what = "";
    last.set = 0;
    switch (op) {
    case OP_START:
        what = "drvAcquire";
        *fd = -1;
        rc = drv->drvAcquire(man, NULL,
                             VIR_LOCK_MANAGER_ACQUIRE_REGISTER_ONLY |
                                 VIR_LOCK_MANAGER_ACQUIRE_RESTRICT,
                             action, fd);
        break;
    case OP_START_RUNNING:
        /* libvirt's not-paused start: the child takes the disks itself. */
        what = "drvAcquire";
        *fd = -1;
        rc = drv->drvAcquire(man, NULL, VIR_LOCK_MANAGER_ACQUIRE_RESTRICT, action, fd);
        break;
    case OP_ACQUIRE:
        what = "drvAcquire";
        rc = drv->drvAcquire(man, NULL, 0, action, NULL);
        break;
    case OP_RELEASE:
        what = "drvRelease";
        state = (char *)"host-sentinel"; /* the plugin must overwrite it */
        rc = drv->drvRelease(man, &state, 0);
        break;
    case OP_RELEASE_NOSTATE:
        what = "drvRelease";
        rc = drv->drvRelease(man, NULL, 0);
        break;
    case OP_INQUIRE:
        what = "drvInquire";
        state = (char *)"host-sentinel";
        rc = drv->drvInquire(man, &state, 0);
        break;
    }
    int ok = 1;
    saved.code = 0;
    saved.domain = 0;
    if (rc < 0) {
        ok = 0;
        if (last.set)
            saved = last;
        else
            snprintf(saved.msg, sizeof(saved.msg), "host: %s returned -1 without raising a "
                     "libvirt error", what);
        if (IS_START(op) && *fd != -1) {
            snprintf(saved.msg, sizeof(saved.msg), "host: drvAcquire failed but left *fd = %d",
                     *fd);
            saved.code = 0;
            saved.domain = 0;
        }
    } else if (last.set) {
        ok = 0;
        snprintf(saved.msg, sizeof(saved.msg), "host: %s returned 0 but raised an error", what);
    } else if (op == OP_RELEASE && state != NULL) {
        ok = 0;
        snprintf(saved.msg, sizeof(saved.msg), "host: drvRelease returned a non-NULL state");
    } else if (IS_START(op)) {
        int fl = *fd >= 0 ? fcntl(*fd, F_GETFD) : -1;
        if (fl < 0) {
            ok = 0;
            snprintf(saved.msg, sizeof(saved.msg),
                     "host: drvAcquire returned fd %d, which is not open", *fd);
        } else if (fl & FD_CLOEXEC) {
            ok = 0;
            snprintf(saved.msg, sizeof(saved.msg),
                     "host: the lifetime fd %d has FD_CLOEXEC set", *fd);
        }
    }
    if (ok && op == OP_INQUIRE && state && strcmp(state, "host-sentinel") == 0) {
        ok = 0;
        snprintf(saved.msg, sizeof(saved.msg), "host: drvInquire left *state untouched");
    }
    if (free_manager(man) < 0 && ok) {
        ok = 0;
        saved = last;
    }
    if (!ok) {
        if (state && strcmp(state, "host-sentinel") != 0)
            free(state);
        reply_err_to(out, saved.code, saved.domain, saved.msg);
        return -1;
    }
    if (state_out)
        *state_out = state;
    else if (state)
        free(state);
    return 0;
}

/* ---- commands ------------------------------------------------------------------------------ */

static void cmd_start(char **t, int n, enum op op)
{
    int pipefd[2];
    /* start-running takes a GATE path before the resources (see the header). */
    int first_res = op == OP_START_RUNNING ? 5 : 4;
    if (n < first_res) {
        reply_host_err(op == OP_START_RUNNING ? "host: usage: start-running NAME UUID ID GATE RES..."
                                              : "host: usage: start NAME UUID ID RES...");
        return;
    }
    if (pipe2(pipefd, O_CLOEXEC) < 0) {
        reply_host_err("host: pipe: %s", strerror(errno));
        return;
    }
    fflush(NULL);
    pid_t child = fork();
    if (child < 0) {
        reply_host_err("host: fork: %s", strerror(errno));
        close(pipefd[0]);
        close(pipefd[1]);
        return;
    }
    if (child == 0) {
        /* libvirt's child: stdio on /dev/null (the domain log in real life), every other
         * descriptor closed except the result pipe. */
        int devnull = open("/dev/null", O_RDWR);
        if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(devnull, 1) < 0)
            _exit(126);
        if (dup2(pipefd[1], 3) < 0)
            _exit(126);
        fcntl(3, F_SETFD, FD_CLOEXEC);
        close_range(4, ~0U, 0);
        FILE *out = fdopen(3, "w");
        if (!out)
            _exit(126);
        int fd = -1;
        if (run_sequence(out, op, t[1], t[2], t[3], NULL, t + first_res, n - first_res,
                         VIR_DOMAIN_LOCK_FAILURE_DEFAULT, &fd, NULL) < 0) {
            fflush(out);
            _exit(125);
        }
        if (op == OP_START_RUNNING && (fd < 0 || fd > 9)) {
            reply_err_to(out, 0, 0, "host: the lifetime fd is not a single digit (sh needs one)");
            fflush(out);
            _exit(125);
        }
        fputs("OK\n", out);
        fflush(out);
        if (dup2(0, 2) < 0)
            _exit(125);
        if (op == OP_START_RUNNING) {
            char script[256];
            snprintf(script, sizeof(script),
                     "while [ -e \"$0\" ]; do sleep 0.02; done; exec %d>&-; exec sleep 1000000",
                     fd);
            execl("/bin/sh", "sh", "-c", script, t[4], (char *)NULL);
        } else {
            execl("/bin/sleep", "sleep", "1000000", (char *)NULL);
        }
        reply_err_to(out, 0, 0, "host: exec /bin/sleep failed");
        _exit(125);
    }
    close(pipefd[1]);
    char buf[MSG_MAX * 2];
    size_t len = 0;
    for (;;) {
        ssize_t r = read(pipefd[0], buf + len, sizeof(buf) - 1 - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
        if (len >= sizeof(buf) - 1)
            break;
    }
    close(pipefd[0]);
    buf[len] = '\0';
    /* The last complete line is the verdict. */
    while (len > 0 && buf[len - 1] == '\n')
        buf[--len] = '\0';
    char *line = strrchr(buf, '\n');
    line = line ? line + 1 : buf;
    if (strcmp(line, "OK") == 0) {
        reply_ok("%d", (int)child);
        return;
    }
    int st;
    while (waitpid(child, &st, 0) < 0 && errno == EINTR)
        ;
    if (strncmp(line, "ERR ", 4) == 0) {
        fputs(line, stdout);
        fputc('\n', stdout);
        fflush(stdout);
    } else {
        reply_host_err("host: the start child died without a verdict (wait status %d)", st);
    }
}

static void cmd_sequence(enum op op, char **t, int n, int argoff, virDomainLockFailureAction act)
{
    char *state = NULL;
    if (n < argoff + 4) {
        reply_host_err("host: usage: %s NAME UUID ID PID RES...", t[0]);
        return;
    }
    if (run_sequence(stdout, op, t[argoff], t[argoff + 1], t[argoff + 2], t[argoff + 3],
                     t + argoff + 4, n - argoff - 4, act, NULL,
                     op == OP_INQUIRE ? &state : NULL) < 0)
        return;
    if (op == OP_INQUIRE && state) {
        fputs("OK ", stdout);
        put_encoded(stdout, state);
        fputc('\n', stdout);
        fflush(stdout);
        free(state);
        return;
    }
    reply_ok(NULL);
}

static int parse_signal(const char *s)
{
    static const struct {
        const char *name;
        int sig;
    } sigs[] = {{"KILL", SIGKILL}, {"TERM", SIGTERM}, {"INT", SIGINT},   {"HUP", SIGHUP},
                {"STOP", SIGSTOP}, {"CONT", SIGCONT}, {"USR1", SIGUSR1}, {"USR2", SIGUSR2}};
    long long n;
    const char *name = strncmp(s, "SIG", 3) == 0 ? s + 3 : s;
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
        if (strcmp(name, sigs[i].name) == 0)
            return sigs[i].sig;
    if (parse_ll(s, &n) == 0 && n >= 0 && n < 65)
        return (int)n;
    return -1;
}

static void cmd_kill(char **t, int n)
{
    long long pid;
    int sig;
    if (n != 3 || parse_ll(t[1], &pid) < 0 || (sig = parse_signal(t[2])) < 0) {
        reply_host_err("host: usage: kill PID SIGNAL");
        return;
    }
    if (kill((pid_t)pid, sig) < 0) {
        reply_host_err("kill: %s", strerror(errno));
        return;
    }
    reply_ok(NULL);
}

static void cmd_wait(char **t, int n)
{
    long long pid;
    int st;
    if (n != 2 || parse_ll(t[1], &pid) < 0) {
        reply_host_err("host: usage: wait PID");
        return;
    }
    pid_t r;
    while ((r = waitpid((pid_t)pid, &st, 0)) < 0 && errno == EINTR)
        ;
    if (r < 0) {
        reply_host_err("waitpid: %s", strerror(errno));
        return;
    }
    reply_ok("%d", st);
}

static void cmd_alive(char **t, int n)
{
    long long pid;
    int st;
    if (n != 2 || parse_ll(t[1], &pid) < 0) {
        reply_host_err("host: usage: alive PID");
        return;
    }
    pid_t r = waitpid((pid_t)pid, &st, WNOHANG);
    if (r == (pid_t)pid) {
        reply_ok("0");
        return;
    }
    if (r == 0) {
        reply_ok("1");
        return;
    }
    /* Not our child: ask the kernel. */
    reply_ok("%d", kill((pid_t)pid, 0) == 0 || errno == EPERM ? 1 : 0);
}

static void cmd_layout(void)
{
    Dl_info info;
    const ElfW(Sym) *sym = NULL;
    unsigned long size = 0;
    if (dladdr1(drv, &info, (void **)&sym, RTLD_DL_SYMENT) && sym)
        size = (unsigned long)sym->st_size;
    int fns = !!drv->drvInit + !!drv->drvDeinit + !!drv->drvNew + !!drv->drvFree +
              !!drv->drvAddResource + !!drv->drvAcquire + !!drv->drvRelease + !!drv->drvInquire;
    reply_ok("size=%lu version=%u flags=%u fns=%d", size, drv->version, drv->flags, fns);
}

static void cmd_fdcount(void)
{
    DIR *d = opendir("/proc/self/fd");
    int count = 0;
    struct dirent *e;
    if (!d) {
        reply_host_err("host: opendir /proc/self/fd: %s", strerror(errno));
        return;
    }
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            count++;
    closedir(d);
    reply_ok("%d", count - 1); /* minus the directory's own descriptor */
}

/* ---- raw commands -------------------------------------------------------------------------- */

static virLockManager *current;

static virLockManager *cur_or_zeroed(virLockManager *zero)
{
    if (current)
        return current;
    memset(zero, 0, sizeof(*zero));
    zero->driver = drv;
    return zero;
}

static void raw_reply(const char *what, int rc)
{
    struct err saved;
    if (check_call(what, rc, &saved) == 0)
        reply_ok(NULL);
}

static void cmd_raw_init(char **t, int n)
{
    unsigned long long version, flags;
    if (n != 4 || parse_ull(t[1], &version) < 0 || parse_ull(t[2], &flags) < 0) {
        reply_host_err("host: usage: raw-init VERSION FLAGS CONFIG");
        return;
    }
    decode(t[3]);
    last.set = 0;
    int rc = drv->drvInit((unsigned int)version, is_null_token(t[3]) ? NULL : t[3],
                          (unsigned int)flags);
    raw_reply("drvInit", rc);
}

static void cmd_raw_new(char **t, int n)
{
    unsigned long long type, flags;
    struct plist pl;
    const char *why = NULL;
    if (n < 3 || parse_ull(t[1], &type) < 0 || parse_ull(t[2], &flags) < 0) {
        reply_host_err("host: usage: raw-new TYPE FLAGS PARAM...");
        return;
    }
    if (parse_params(t + 3, n - 3, &pl, &why) < 0) {
        reply_host_err("host: %s", why);
        return;
    }
    if (current) {
        free_manager(current);
        current = NULL;
    }
    virLockManager *man = new_manager();
    last.set = 0;
    int rc = drv->drvNew(man, (unsigned int)type, pl.n, pl.ptr, (unsigned int)flags);
    if (rc < 0 && man->privateData) {
        reply_host_err("host: drvNew failed but left privateData set");
        free(man);
        return;
    }
    struct err saved;
    if (check_call("drvNew", rc, &saved) < 0) {
        if (rc < 0)
            free(man);
        else
            free_manager(man);
        return;
    }
    current = man;
    reply_ok(NULL);
}

static void cmd_raw_add(char **t, int n)
{
    unsigned long long type, flags;
    struct plist pl;
    const char *why = NULL;
    virLockManager zero;
    if (n < 4 || parse_ull(t[1], &type) < 0 || parse_ull(t[2], &flags) < 0) {
        reply_host_err("host: usage: raw-add TYPE FLAGS NAME PARAM...");
        return;
    }
    if (parse_params(t + 4, n - 4, &pl, &why) < 0) {
        reply_host_err("host: %s", why);
        return;
    }
    decode(t[3]);
    last.set = 0;
    int rc = drv->drvAddResource(cur_or_zeroed(&zero), (unsigned int)type,
                                 is_null_token(t[3]) ? NULL : t[3], pl.n, pl.ptr,
                                 (unsigned int)flags);
    raw_reply("drvAddResource", rc);
}

static void cmd_raw_acquire(char **t, int n)
{
    unsigned long long flags;
    virDomainLockFailureAction action;
    virLockManager zero;
    if (n != 5 || parse_ull(t[1], &flags) < 0 || parse_action(t[2], &action) < 0 ||
        (strcmp(t[4], "fd") != 0 && strcmp(t[4], "nofd") != 0)) {
        reply_host_err("host: usage: raw-acquire FLAGS ACTION STATE fd|nofd");
        return;
    }
    decode(t[3]);
    int want_fd = strcmp(t[4], "fd") == 0;
    int fd = -1;
    last.set = 0;
    int rc = drv->drvAcquire(cur_or_zeroed(&zero), is_null_token(t[3]) ? NULL : t[3],
                             (unsigned int)flags, action, want_fd ? &fd : NULL);
    if (rc < 0 && fd != -1) {
        reply_host_err("host: drvAcquire failed but left *fd = %d", fd);
        close(fd);
        return;
    }
    struct err saved;
    if (check_call("drvAcquire", rc, &saved) < 0)
        return;
    if (!want_fd) {
        reply_ok(NULL);
        return;
    }
    int fl = fd >= 0 ? fcntl(fd, F_GETFD) : -1;
    if (fl < 0) {
        reply_host_err("host: drvAcquire returned fd %d, which is not open", fd);
        return;
    }
    reply_ok("fd=%d cloexec=%d", fd, (fl & FD_CLOEXEC) ? 1 : 0);
}

static void cmd_raw_state_call(char **t, int n, int inquire)
{
    unsigned long long flags;
    virLockManager zero;
    const char *what = inquire ? "drvInquire" : "drvRelease";
    if (n != 3 || parse_ull(t[1], &flags) < 0 ||
        (strcmp(t[2], "state") != 0 && strcmp(t[2], "nostate") != 0)) {
        reply_host_err("host: usage: %s FLAGS state|nostate", t[0]);
        return;
    }
    int want_state = strcmp(t[2], "state") == 0;
    char *state = NULL;
    last.set = 0;
    virLockManager *man = cur_or_zeroed(&zero);
    int rc = inquire ? drv->drvInquire(man, want_state ? &state : NULL, (unsigned int)flags)
                     : drv->drvRelease(man, want_state ? &state : NULL, (unsigned int)flags);
    struct err saved;
    if (check_call(what, rc, &saved) < 0) {
        free(state);
        return;
    }
    if (state) {
        fputs("OK state=", stdout);
        put_encoded(stdout, state);
        fputc('\n', stdout);
        fflush(stdout);
        free(state);
        return;
    }
    reply_ok(NULL);
}

static void cmd_raw_free(void)
{
    virLockManager zero;
    last.set = 0;
    if (current) {
        int raised = free_manager(current);
        current = NULL;
        if (raised < 0) {
            reply_err(&last);
            return;
        }
        reply_ok(NULL);
        return;
    }
    drv->drvFree(cur_or_zeroed(&zero));
    if (last.set) {
        reply_err(&last);
        return;
    }
    reply_ok(NULL);
}

static void cmd_raw_null_man(char **t, int n)
{
    static virLockManagerParam none[1];
    char *state = NULL;
    int fd = -1;
    int rc;
    if (n != 2) {
        reply_host_err("host: usage: raw-null-man new|add|acquire|release|inquire|free");
        return;
    }
    last.set = 0;
    if (strcmp(t[1], "new") == 0)
        rc = drv->drvNew(NULL, VIR_LOCK_MANAGER_OBJECT_TYPE_DOMAIN, 0, none, 0);
    else if (strcmp(t[1], "add") == 0)
        rc = drv->drvAddResource(NULL, VIR_LOCK_MANAGER_RESOURCE_TYPE_DISK, "/x", 0, NULL, 0);
    else if (strcmp(t[1], "acquire") == 0)
        rc = drv->drvAcquire(NULL, NULL, 0, VIR_DOMAIN_LOCK_FAILURE_DEFAULT, &fd);
    else if (strcmp(t[1], "release") == 0)
        rc = drv->drvRelease(NULL, &state, 0);
    else if (strcmp(t[1], "inquire") == 0)
        rc = drv->drvInquire(NULL, &state, 0);
    else if (strcmp(t[1], "free") == 0) {
        drv->drvFree(NULL);
        if (last.set)
            reply_err(&last);
        else
            reply_ok(NULL);
        return;
    } else {
        reply_host_err("host: unknown op %s", t[1]);
        return;
    }
    if (rc < 0 && fd != -1) {
        reply_host_err("host: drvAcquire failed but left *fd = %d", fd);
        return;
    }
    raw_reply(t[1], rc);
}

/* ---- main ---------------------------------------------------------------------------------- */

static int tokenize(char *line, char **toks)
{
    int n = 0;
    char *save = NULL;
    for (char *tok = strtok_r(line, " ", &save); tok && n < MAX_TOKENS;
         tok = strtok_r(NULL, " ", &save))
        toks[n++] = tok;
    return n;
}

int main(int argc, char **argv)
{
    static char *toks[MAX_TOKENS];
    char *line = NULL;
    size_t cap = 0;

    if (argc < 3 || argc > 4 || (argc == 4 && strcmp(argv[3], "--no-init") != 0)) {
        fprintf(stderr, "usage: %s PLUGIN.so CONFIG_FILE [--no-init]\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    void *handle = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        reply_err_to(stdout, 0, 0, dlerror());
        return 1;
    }
    drv = dlsym(handle, "virLockDriverImpl");
    if (!drv) {
        reply_err_to(stdout, 0, 0, dlerror());
        return 1;
    }
    if (argc == 3) {
        char *conf = argv[2];
        last.set = 0;
        int rc = drv->drvInit(VIR_LOCK_MANAGER_VERSION, is_null_token(conf) ? NULL : conf, 0);
        if (rc < 0) {
            if (last.set)
                reply_err(&last);
            else
                reply_host_err("host: drvInit returned %d without raising a libvirt error", rc);
            return 1;
        }
        if (last.set) {
            reply_host_err("host: drvInit returned 0 but raised an error: %s", last.msg);
            return 1;
        }
    }
    puts("READY");
    fflush(stdout);

    for (;;) {
        ssize_t len = getline(&line, &cap, stdin);
        if (len < 0)
            break;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        int n = tokenize(line, toks);
        if (n == 0) {
            reply_host_err("host: empty command");
            continue;
        }
        const char *c = toks[0];
        if (strcmp(c, "start") == 0)
            cmd_start(toks, n, OP_START);
        else if (strcmp(c, "start-running") == 0)
            cmd_start(toks, n, OP_START_RUNNING);
        else if (strcmp(c, "acquire") == 0)
            cmd_sequence(OP_ACQUIRE, toks, n, 1, VIR_DOMAIN_LOCK_FAILURE_DEFAULT);
        else if (strcmp(c, "acquire-action") == 0) {
            virDomainLockFailureAction act;
            if (n < 2 || parse_action(toks[1], &act) < 0)
                reply_host_err("host: usage: acquire-action ACTION NAME UUID ID PID RES...");
            else
                cmd_sequence(OP_ACQUIRE, toks, n, 2, act);
        } else if (strcmp(c, "release") == 0)
            cmd_sequence(OP_RELEASE, toks, n, 1, VIR_DOMAIN_LOCK_FAILURE_DEFAULT);
        else if (strcmp(c, "release-nostate") == 0)
            cmd_sequence(OP_RELEASE_NOSTATE, toks, n, 1, VIR_DOMAIN_LOCK_FAILURE_DEFAULT);
        else if (strcmp(c, "inquire") == 0)
            cmd_sequence(OP_INQUIRE, toks, n, 1, VIR_DOMAIN_LOCK_FAILURE_DEFAULT);
        else if (strcmp(c, "kill") == 0)
            cmd_kill(toks, n);
        else if (strcmp(c, "wait") == 0)
            cmd_wait(toks, n);
        else if (strcmp(c, "alive") == 0)
            cmd_alive(toks, n);
        else if (strcmp(c, "layout") == 0)
            cmd_layout();
        else if (strcmp(c, "fdcount") == 0)
            cmd_fdcount();
        else if (strcmp(c, "close") == 0) {
            long long fd;
            if (n != 2 || parse_ll(toks[1], &fd) < 0)
                reply_host_err("host: usage: close FD");
            else if (close((int)fd) < 0)
                reply_host_err("close: %s", strerror(errno));
            else
                reply_ok(NULL);
        } else if (strcmp(c, "raw-init") == 0)
            cmd_raw_init(toks, n);
        else if (strcmp(c, "raw-new") == 0)
            cmd_raw_new(toks, n);
        else if (strcmp(c, "raw-add") == 0)
            cmd_raw_add(toks, n);
        else if (strcmp(c, "raw-acquire") == 0)
            cmd_raw_acquire(toks, n);
        else if (strcmp(c, "raw-release") == 0)
            cmd_raw_state_call(toks, n, 0);
        else if (strcmp(c, "raw-inquire") == 0)
            cmd_raw_state_call(toks, n, 1);
        else if (strcmp(c, "raw-free") == 0)
            cmd_raw_free();
        else if (strcmp(c, "raw-null-man") == 0)
            cmd_raw_null_man(toks, n);
        else if (strcmp(c, "deinit") == 0) {
            last.set = 0;
            int rc = drv->drvDeinit();
            if (rc < 0 && last.set)
                reply_err(&last);
            else
                reply_ok("%d", rc);
        } else if (strcmp(c, "quit") == 0)
            break;
        else
            reply_host_err("host: unknown command %s", c);
    }
    free(line);
    return 0;
}
