//! Deterministic surroundings for BPF_PROG_TEST_RUN: a thread pinned to one
//! CPU (per-CPU cursors and sequence numbers), optionally in a network
//! namespace of its own (the FIB that `bpf_fib_lookup` consults).
//!
//! Namespaces and affinity are per thread, so each fixture runs on a thread
//! of its own: nothing leaks into the test harness's threads, and the
//! namespace (with every device in it) disappears when the thread ends,
//! panics included.
#![allow(dead_code)]

use std::process::Command;

/// Pins the calling thread to the CPU it is running on; returns that CPU.
pub fn pin_to_current_cpu() -> u32 {
    // SAFETY: no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    assert!(
        cpu >= 0,
        "sched_getcpu: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (the kernel returned it).
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
    cpu as u32
}

/// Runs `f` on a new thread pinned to one CPU, passing that CPU's id.
/// A panic in `f` is re-raised here with its original message.
pub fn pinned<R: Send>(f: impl FnOnce(u32) -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| f(pin_to_current_cpu()))
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Runs `f` on a new thread pinned to one CPU and moved into a fresh
/// network namespace (loopback up, IPv4 and IPv6 forwarding on). Child processes
/// started from `f` (see [`ip`]) inherit the namespace.
pub fn in_netns<R: Send>(f: impl FnOnce(u32) -> R + Send) -> R {
    super::require_root();
    pinned(|cpu| {
        let host = netns_id();
        // SAFETY: affects only the calling thread's namespace membership.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        assert_ne!(netns_id(), host, "still in the original network namespace");
        ip(&["link", "set", "lo", "up"]);
        // /proc/sys/net resolves against the opening thread's namespace.
        for knob in [
            "ipv4/ip_forward",
            "ipv4/conf/all/forwarding",
            "ipv4/conf/lo/forwarding",
            "ipv6/conf/all/forwarding",
            "ipv6/conf/lo/forwarding",
        ] {
            let path = format!("/proc/sys/net/{knob}");
            std::fs::write(&path, "1").unwrap_or_else(|e| panic!("write {path}: {e}"));
            let v = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
            assert_eq!(v.trim(), "1", "{path}");
        }
        f(cpu)
    })
}

/// Runs `ip ARGS` (in the calling thread's namespace); panics on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The inode of the calling thread's network namespace.
pub fn netns_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .expect("stat /proc/thread-self/ns/net")
        .ino()
}
