//! Reads the host's memory and CPU facts from /proc. Nothing else.

use berth_api::HostStats;

/// Parses /proc/meminfo text into (total, available) MiB.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let mut total = None;
    let mut avail = None;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some("MemTotal:"), Some(v)) => total = v.parse::<u64>().ok(),
            (Some("MemAvailable:"), Some(v)) => avail = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    Some((total? / 1024, avail? / 1024))
}

pub fn memory() -> HostStats {
    let (total_mib, available_mib) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| parse_meminfo(&t)).unwrap_or((0, 0));
    HostStats { total_mib, available_mib }
}

/// Total and used MiB of the filesystem holding `path` (statvfs).
pub fn disk(path: &std::path::Path) -> Option<berth_api::DiskStats> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a
    // valid NUL-terminated string.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    let total = st.f_blocks as u64 * frsize;
    let avail = st.f_bavail as u64 * frsize;
    Some(berth_api::DiskStats { total_mib: total / (1024 * 1024), used_mib: total.saturating_sub(avail) / (1024 * 1024) })
}

pub fn cpu_cores() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn disk_of_the_temp_dir() {
        let d = super::disk(&std::env::temp_dir()).unwrap();
        assert!(d.total_mib > 0 && d.used_mib <= d.total_mib);
    }

    #[test]
    fn meminfo_in_mib() {
        let t = "MemTotal:       24576000 kB\nMemFree:        100 kB\nMemAvailable:   20480000 kB\n";
        assert_eq!(super::parse_meminfo(t), Some((24000, 20000)));
        assert_eq!(super::parse_meminfo("MemTotal: 5 kB\n"), None);
    }
}
