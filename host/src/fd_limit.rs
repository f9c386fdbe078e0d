//! The process's file-descriptor limit. Every HTTP connection, peer connection and open file
//! takes a descriptor, and the soft limit many systems start processes with (1,024) would stop
//! a node far below `--max-connections`. `lockstep serve` raises it to the hard limit at start,
//! as Go's runtime does for every Go server (etcd among them), and the HTTP server sizes its
//! connection cap to what is left.

/// The soft limit in force, or `None` where the OS does not say.
pub fn soft() -> Option<u64> {
    get().ok().map(|(soft, _)| soft)
}

/// Raises the soft limit to the hard one.
pub fn raise() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let (soft, hard) = get()?;
        // macOS reports an unlimited hard limit but refuses a soft one above OPEN_MAX.
        #[cfg(target_os = "macos")]
        let target = hard.min(10_240);
        #[cfg(not(target_os = "macos"))]
        let target = hard;
        if soft >= target {
            return Ok(());
        }
        let raised = libc::rlimit {
            rlim_cur: target as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: `raised` is a valid rlimit; raising the soft limit up to the hard one needs no
        // privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `(soft, hard)`.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not on every unix
fn get() -> std::io::Result<(u64, u64)> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid rlimit for the call to fill.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((lim.rlim_cur as u64, lim.rlim_max as u64))
    }
    #[cfg(not(unix))]
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "no descriptor limit here",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn raises_the_soft_limit_to_the_hard_one() {
        let (_, hard) = super::get().expect("getrlimit");
        // One below the hard limit first (lowering needs no privilege), so the raise has
        // something to do even where soft and hard start equal.
        let lowered = libc::rlimit {
            rlim_cur: (hard - 1) as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: a valid rlimit, within the hard limit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        assert_eq!(super::soft(), Some(hard - 1));
        super::raise().expect("raise");
        assert_eq!(super::soft(), Some(hard));
    }
}
