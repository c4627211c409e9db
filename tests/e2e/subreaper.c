/* subreaper: run a command as a child subreaper, reap every orphan at once, and kill what is left.
 *
 * Usage: subreaper COMMAND [ARG...]
 *
 * Why: libvirt double-forks QEMU, so QEMU becomes an orphan. Reparented to this machine's PID 1
 * it is reaped only about once a second, and `virsh destroy` waits for the zombie to vanish
 * (~1.4 s extra per VM). Under this subreaper the orphan is reaped at once.
 * It is also the e2e suite's last line of cleanup: when COMMAND exits, every process still
 * below this one (libvirtd, QEMU, lockwardend, virtlockd, namespace anchors, whatever a failing
 * script forgot) gets SIGKILL, and the subreaper waits until none is left.
 *
 * SIGINT/SIGTERM/SIGHUP are forwarded to COMMAND. Exit status: COMMAND's (128+signal if it was
 * killed by a signal).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t main_pid;

static void forward(int sig)
{
    if (main_pid > 0)
        kill((pid_t)main_pid, sig);
}

/* SIGKILL every direct child (orphans reparent to us); returns how many were signalled. */
static int kill_children(void)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    int n = 0;
    pid_t self = getpid();

    if (!d)
        return 0;
    while ((e = readdir(d))) {
        char path[64], buf[512];
        FILE *f;
        char *p;
        long ppid;
        pid_t pid = (pid_t)strtol(e->d_name, &p, 10);

        if (*p || pid <= 0)
            continue;
        snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
        f = fopen(path, "r");
        if (!f)
            continue;
        if (!fgets(buf, sizeof(buf), f)) {
            fclose(f);
            continue;
        }
        fclose(f);
        /* "pid (comm) state ppid ...": comm may contain spaces and parentheses. */
        p = strrchr(buf, ')');
        if (!p || sscanf(p + 1, " %*c %ld", &ppid) != 1)
            continue;
        if ((pid_t)ppid == self) {
            kill(pid, SIGKILL);
            n++;
        }
    }
    closedir(d);
    return n;
}

int main(int argc, char **argv)
{
    int status = 0, main_status = 0, leftovers = 0;
    pid_t pid;
    struct sigaction sa;

    if (argc < 2) {
        fprintf(stderr, "usage: subreaper COMMAND [ARG...]\n");
        return 2;
    }
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) {
        perror("subreaper: prctl(PR_SET_CHILD_SUBREAPER)");
        return 2;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = forward;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    pid = fork();
    if (pid < 0) {
        perror("subreaper: fork");
        return 2;
    }
    if (pid == 0) {
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGHUP, SIG_DFL);
        /* If the subreaper is killed outright, COMMAND still gets to run its cleanup. */
        prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0);
        execvp(argv[1], argv + 1);
        fprintf(stderr, "subreaper: cannot run %s: %s\n", argv[1], strerror(errno));
        _exit(127);
    }
    main_pid = pid;

    /* Reap everything until COMMAND itself exits. */
    for (;;) {
        pid_t w = waitpid(-1, &status, 0);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            break; /* ECHILD: cannot happen before COMMAND exits */
        }
        if (w == pid) {
            main_status = status;
            break;
        }
    }
    main_pid = 0;

    /* Final sweep: nothing started below us may outlive the suite. */
    for (;;) {
        pid_t w;
        if (kill_children() > 0)
            leftovers = 1;
        while ((w = waitpid(-1, &status, WNOHANG)) > 0)
            ;
        if (w < 0 && errno == ECHILD)
            break;
        usleep(20000);
    }
    if (leftovers)
        fprintf(stderr, "subreaper: killed leftover process(es) after %s exited\n", argv[1]);

    if (WIFEXITED(main_status))
        return WEXITSTATUS(main_status);
    if (WIFSIGNALED(main_status))
        return 128 + WTERMSIG(main_status);
    return 1;
}
