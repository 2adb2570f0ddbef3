/* lfs-probe: make one system call per argument and print what the kernel answered.
 *
 * Built static by the runtime tests (tests/runtime/conftest.py) and copied into the
 * test rootfs, so that tests can see exactly which calls a container may make:
 *
 *     lfs-probe keyctl unshare-user-mount kexec_load
 *     keyctl EPERM
 *     unshare-user-mount OK
 *     kexec_load EPERM
 *
 * Each line is "PROBE OK [detail]" or "PROBE <errno name>". Arguments of the form
 * NAME:VALUE pass VALUE to the probe (a key description). Nothing here changes the
 * host unless the container is allowed to: that is what the tests check.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/keyctl.h>
#include <linux/perf_event.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

typedef int32_t key_serial_t;

static const char *errname(int e) {
    switch (e) {
    case EPERM: return "EPERM";
    case ENOSYS: return "ENOSYS";
    case EINVAL: return "EINVAL";
    case EACCES: return "EACCES";
    case ENOKEY: return "ENOKEY";
    case EBADF: return "EBADF";
    case ENOENT: return "ENOENT";
    case EFAULT: return "EFAULT";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case ESTALE: return "ESTALE";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ENODEV: return "ENODEV";
    default: {
        static char buf[32];
        snprintf(buf, sizeof buf, "E%d", e);
        return buf;
    }
    }
}

static int report(const char *name, long rc) {
    if (rc < 0)
        printf("%s %s\n", name, errname(errno));
    else
        printf("%s OK\n", name);
    return 0;
}

/* Key ids in the user keyring (@u), or -1 with errno. */
static long user_keys(key_serial_t *ids, size_t max) {
    long n = syscall(SYS_keyctl, KEYCTL_READ, KEY_SPEC_USER_KEYRING, ids,
                     max * sizeof(key_serial_t), 0);
    return n < 0 ? n : n / (long)sizeof(key_serial_t);
}

static void *thread_main(void *arg) { return arg; }

static int probe(const char *arg) {
    char name[64];
    const char *value = strchr(arg, ':');
    size_t len = value ? (size_t)(value - arg) : strlen(arg);
    if (len >= sizeof name) len = sizeof name - 1;
    memcpy(name, arg, len);
    name[len] = 0;
    if (value) value++;

    if (!strcmp(name, "keyctl"))
        return report(name, syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0));
    if (!strcmp(name, "keyctl-list")) {     /* print the description of every key in @u */
        key_serial_t ids[256];
        long n = user_keys(ids, 256);
        if (n < 0) return report(name, n);
        printf("%s OK %ld\n", name, n);
        for (long i = 0; i < n; i++) {
            char desc[512];
            if (syscall(SYS_keyctl, KEYCTL_DESCRIBE, ids[i], desc, sizeof desc, 0) > 0)
                printf("key %d %s\n", ids[i], desc);
        }
        return 0;
    }
    if (!strcmp(name, "keyctl-unlink")) {   /* unlink the @u keys described exactly VALUE */
        key_serial_t ids[256];
        long n = user_keys(ids, 256), done = 0;
        if (n < 0 || !value) return report(name, -1);
        for (long i = 0; i < n; i++) {
            char desc[512];
            if (syscall(SYS_keyctl, KEYCTL_DESCRIBE, ids[i], desc, sizeof desc, 0) <= 0) continue;
            const char *last = strrchr(desc, ';');
            if (last && !strcmp(last + 1, value)) {
                if (syscall(SYS_keyctl, KEYCTL_UNLINK, ids[i], KEY_SPEC_USER_KEYRING, 0, 0) < 0)
                    return report(name, -1);
                done++;
            }
        }
        printf("%s OK %ld\n", name, done);
        return 0;
    }
    if (!strcmp(name, "add_key"))
        return report(name, syscall(SYS_add_key, "user", value ? value : "lfs-probe", "x", 1,
                                    KEY_SPEC_USER_KEYRING));
    if (!strcmp(name, "request_key"))
        return report(name, syscall(SYS_request_key, "user", "lfs-probe-absent", NULL, 0));
    if (!strcmp(name, "unshare-user-mount")) {
        /* In a child: a new user namespace gives full capabilities inside it, enough
         * for a new mount namespace and a tmpfs mount. */
        pid_t pid = fork();
        if (pid == 0) {
            if (unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0) _exit(10 + errno);
            if (mount("none", "/tmp", "tmpfs", 0, NULL) < 0) _exit(100 + errno);
            _exit(0);
        }
        int st = 0;
        waitpid(pid, &st, 0);
        int code = WEXITSTATUS(st);
        if (code == 0) printf("%s OK mounted\n", name);
        else if (code >= 100) printf("%s mount-%s\n", name, errname(code - 100));
        else printf("%s %s\n", name, errname(code - 10));
        return 0;
    }
    if (!strcmp(name, "clone-newuser")) {
        long pid = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
        if (pid == 0) _exit(0);
        if (pid > 0) waitpid((pid_t)pid, NULL, 0);
        return report(name, pid);
    }
    if (!strcmp(name, "clone3")) {
        struct { unsigned long long v[11]; } args = {{0}};
        args.v[4] = SIGCHLD;   /* exit_signal */
        long pid = syscall(SYS_clone3, &args, sizeof args);
        if (pid == 0) _exit(0);
        if (pid > 0) waitpid((pid_t)pid, NULL, 0);
        return report(name, pid);
    }
    if (!strcmp(name, "kexec_load"))  /* an invalid architecture: EINVAL if it gets that far */
        return report(name, syscall(SYS_kexec_load, 0, 0, NULL, 0xffff0000UL));
    if (!strcmp(name, "open_by_handle_at")) {
        struct { unsigned int bytes; int type; unsigned char h[8]; } fh = {8, 1, {0}};
        return report(name, syscall(SYS_open_by_handle_at, AT_FDCWD, &fh, O_RDONLY));
    }
    if (!strcmp(name, "bpf")) {       /* BPF_MAP_CREATE with an empty attribute: EINVAL */
        char attr[64] = {0};
        return report(name, syscall(SYS_bpf, 0, attr, sizeof attr));
    }
    if (!strcmp(name, "perf_event_open")) {  /* count our own user-space CPU clock */
        struct perf_event_attr pe;
        memset(&pe, 0, sizeof pe);
        pe.type = PERF_TYPE_SOFTWARE;
        pe.size = sizeof pe;
        pe.config = PERF_COUNT_SW_CPU_CLOCK;
        pe.exclude_kernel = 1;
        pe.exclude_hv = 1;
        long fd = syscall(SYS_perf_event_open, &pe, 0, -1, -1, 0);
        if (fd >= 0) close((int)fd);
        return report(name, fd);
    }
    if (!strcmp(name, "mount"))
        return report(name, mount("none", "/tmp", "tmpfs", 0, NULL));
    if (!strcmp(name, "userfaultfd"))
        return report(name, syscall(SYS_userfaultfd, 0));
    if (!strcmp(name, "io_uring_setup")) {
        char params[120] = {0};
        return report(name, syscall(SYS_io_uring_setup, 1, params));
    }
    if (!strcmp(name, "ptrace")) {    /* a child asks to be traced by us, then stops */
        pid_t pid = fork();
        if (pid == 0) {
            if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) < 0) _exit(10 + errno);
            raise(SIGSTOP);
            _exit(0);
        }
        int st = 0;
        waitpid(pid, &st, 0);
        if (WIFSTOPPED(st)) {
            ptrace(PTRACE_CONT, pid, NULL, NULL);
            waitpid(pid, &st, 0);
            printf("%s OK\n", name);
        } else {
            printf("%s %s\n", name, errname(WEXITSTATUS(st) - 10));
        }
        return 0;
    }
    if (!strcmp(name, "personality-query"))
        return report(name, personality(0xffffffff));
    if (!strcmp(name, "personality-norandom"))
        return report(name, personality(ADDR_NO_RANDOMIZE));
    if (!strcmp(name, "socket-inet")) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd >= 0) close(fd);
        return report(name, fd);
    }
    if (!strcmp(name, "socket-vsock")) {
        int fd = socket(40 /* AF_VSOCK */, SOCK_STREAM, 0);
        if (fd >= 0) close(fd);
        return report(name, fd);
    }
    if (!strcmp(name, "socket-alg")) {
        int fd = socket(38 /* AF_ALG */, SOCK_SEQPACKET, 0);
        if (fd >= 0) close(fd);
        return report(name, fd);
    }
    if (!strcmp(name, "threads")) {   /* what every threaded runtime (Python, Go, JVM) does */
        pthread_t t[4];
        for (int i = 0; i < 4; i++) {
            int rc = pthread_create(&t[i], NULL, thread_main, NULL);
            if (rc) { errno = rc; return report(name, -1); }
        }
        for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
        printf("%s OK\n", name);
        return 0;
    }
    printf("%s unknown-probe\n", name);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++) probe(argv[i]);
    return 0;
}
