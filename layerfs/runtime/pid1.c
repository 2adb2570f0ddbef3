/* layerfs-init: the two moments a container's process changes program, as a small static
 * binary that the runner executes from a sealed memfd (layerfs/runtime/helper.py).
 *
 * Why: the runner is Python, and the container's first processes are forks of it. Had
 * they exec'd the container's program themselves, "/proc/self/exe" would name the host's
 * python binary at that moment; a program starting "#!/proc/self/exe" then ran the host
 * interpreter inside the container (the CVE-2019-5736 pattern, which overwrote runc).
 * Exec'ing through this helper, from a memfd that is sealed against writes, means the
 * only executable a container can reach that way is an anonymous, read-only copy of this
 * file. Built by setup.py (cc -static); no libc or loader is needed in the container.
 *
 *   argv[0] = "layerfs-exec" ERRFD PATH ARGV0 ARGS...
 *       The last step of the main process and of `exec` processes, after the runner has
 *       set up ids, capabilities, no_new_privs and the seccomp filter: execve(PATH).
 *       ERRFD (the runner's exec-error pipe) is made close-on-exec first, so the runner
 *       sees EOF when PATH runs; if execve fails, one JSON line (the runner's format) goes
 *       to it and the exit code is 127.
 *
 *   argv[0] = "layerfs-init", LAYERFS_INIT="MAIN_PID STATUS_FD ALIVE_FD INIT_FD" in the
 *       environment
 *       PID 1 after the main process started. First close INIT_FD (or -1): the main
 *       process waits for that EOF before it runs its program, so the program never sees
 *       PID 1 as the runner's python (whose command line names the host's paths). Then
 *       reap every child, forward signals to the main process, SIGKILL it when the
 *       runner's liveness pipe ALIVE_FD (or -1) hangs up, and when it exits write its raw
 *       wait status to STATUS_FD and exit with the shell-style code (128+N for signal N).
 *       The runner blocked the signals before exec'ing us, so none is lost in between.
 *
 * Anything else (e.g. the kernel running us as the interpreter of "#!/proc/self/exe")
 * exits 126 with a message: this program never runs what it is not told to.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static void json_string(int fd, const char *s) {
    char buf[8];
    dprintf(fd, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            dprintf(fd, "\\%c", c);
        } else if (c < 0x20 || c >= 0x7f) {
            snprintf(buf, sizeof buf, "\\u%04x", c);
            dprintf(fd, "%s", buf);
        } else {
            dprintf(fd, "%c", c);
        }
    }
    dprintf(fd, "\"");
}

static int exec_main(int argc, char **argv) {
    if (argc < 4) {
        dprintf(2, "layerfs-exec: usage: layerfs-exec ERRFD PATH ARGV0 [ARGS...]\n");
        return 126;
    }
    int errfd = atoi(argv[1]);
    fcntl(errfd, F_SETFD, FD_CLOEXEC);
    execve(argv[2], argv + 3, environ);
    int e = errno;
    dprintf(errfd, "{\"stage\": \"exec\", \"type\": \"OSError\", \"message\": ");
    json_string(errfd, strerror(e));
    dprintf(errfd, ", \"errno\": %d, \"filename\": ", e);
    json_string(errfd, argv[2]);
    dprintf(errfd, "}\n");
    return 127;
}

/* Signals PID 1 passes on; the rest are faults, job control or cannot be caught. */
static int forwarded(int sig) {
    switch (sig) {
    case SIGKILL: case SIGSTOP: case SIGCHLD: case SIGSEGV: case SIGBUS: case SIGILL:
    case SIGFPE: case SIGABRT: case SIGTRAP: case SIGSYS: case SIGTTIN: case SIGTTOU:
    case SIGIO:
        return 0;
    }
    return 1;
}

static void runner_check(int alive_fd, pid_t main_pid) {
    char c;
    if (alive_fd >= 0 && read(alive_fd, &c, 1) == 0)   /* EOF: the runner died */
        kill(main_pid, SIGKILL);
}

static int init_main(void) {
    const char *params = getenv("LAYERFS_INIT");
    int main_pid = 0, status_fd = -1, alive_fd = -1, init_fd = -1;
    if (!params || sscanf(params, "%d %d %d %d", &main_pid, &status_fd, &alive_fd,
                          &init_fd) < 3 || main_pid <= 0) {
        dprintf(2, "layerfs-init: LAYERFS_INIT is missing or malformed\n");
        return 126;
    }
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);   /* nothing in the container may ptrace or open us */
    prctl(PR_SET_NAME, "layerfs-init", 0, 0, 0);

    sigset_t waited;
    sigfillset(&waited);
    sigdelset(&waited, SIGSEGV);
    sigdelset(&waited, SIGBUS);
    sigdelset(&waited, SIGILL);
    sigdelset(&waited, SIGFPE);
    sigdelset(&waited, SIGABRT);
    sigdelset(&waited, SIGTRAP);
    sigdelset(&waited, SIGSYS);
    sigprocmask(SIG_BLOCK, &waited, NULL);
    if (init_fd >= 0)
        close(init_fd);   /* we run: the main process may exec its program now */

    if (alive_fd >= 0) {
        /* The kernel signals the readers of a pipe when its last writer goes away. */
        fcntl(alive_fd, F_SETOWN, getpid());
        fcntl(alive_fd, F_SETFL, fcntl(alive_fd, F_GETFL) | O_ASYNC | O_NONBLOCK);
        runner_check(alive_fd, main_pid);   /* it may be gone already */
    }
    for (;;) {
        int status;
        pid_t pid;
        /* Reap first: the main process may have exited before we got here. */
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            if (pid == main_pid) {
                dprintf(status_fd, "%d\n", status);
                if (WIFSIGNALED(status))
                    return 128 + WTERMSIG(status);
                return WEXITSTATUS(status);
            }
        }
        if (pid < 0 && errno == ECHILD) {
            dprintf(status_fd, "%d\n", 255 << 8);
            return 255;
        }
        siginfo_t info;
        int sig = sigwaitinfo(&waited, &info);
        if (sig < 0)
            continue;
        if (sig == SIGIO)
            runner_check(alive_fd, main_pid);
        else if (forwarded(sig))
            kill(main_pid, sig);
    }
}

int main(int argc, char **argv) {
    const char *name = argc > 0 ? argv[0] : "";
    if (!strcmp(name, "layerfs-exec"))
        return exec_main(argc, argv);
    if (!strcmp(name, "layerfs-init"))
        return init_main();
    dprintf(2, "layerfs-init: refusing to run as %s (this is layerfs's container helper, not a "
               "program for the container)\n", name);
    return 126;
}
