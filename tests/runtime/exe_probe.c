/* exe-probe: what a hostile image puts where the dynamic loader belongs
 * (/lib64/ld-linux-x86-64.so.2). If the kernel ever runs a *host* binary in the
 * container (a "#!/proc/self/exe" script exec'd by a process whose exe is the host's
 * python), this runs as that binary's interpreter and prints the device:inode of
 * /proc/self/exe and what opening it for writing gives (an errno number, or OK).
 *
 * No libc (a static glibc cannot start as another program's interpreter): raw x86-64
 * system calls. Built by tests/runtime/test_host_binary.py, x86-64 only.
 */
typedef unsigned long u64;
static long sys(long n, long a, long b, long c, long d) {
    long r;
    register long r10 __asm__("r10") = d;
    __asm__ volatile ("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return r;
}
static void put(const char *s) { long n = 0; while (s[n]) n++; sys(1, 1, (long)s, n, 0); }
static void num(u64 v) { char b[24]; int i = 23; b[i] = 0; do { b[--i] = '0' + v % 10; v /= 10; } while (v); put(b + i); }
struct kstat { u64 dev, ino, nlink; unsigned mode, uid, gid, pad; u64 rdev; long size, blksize, blocks; u64 t[6]; long unused[3]; };
void _start(void) {
    struct kstat st;
    long r = sys(4, (long)"/proc/self/exe", (long)&st, 0, 0);   /* stat */
    if (r == 0) { put("exe-probe "); num(st.dev); put(":"); num(st.ino); put("\n"); }
    else { put("exe-probe-stat "); num(-r); put("\n"); }
    r = sys(2, (long)"/proc/self/exe", 1 /* O_WRONLY */, 0, 0);   /* open */
    put("exe-probe open-write "); if (r >= 0) put("OK\n"); else { num(-r); put("\n"); }
    sys(60, 0, 0, 0, 0);
}
