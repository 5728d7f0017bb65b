//! Preflight before a start: the host really has the memory (not just on
//! paper) and the port is free. The decision is pure; `port_is_free` is
//! the one probe of the host it needs. A failed preflight is a transient
//! error: the control plane releases the reservation and retries later.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreflightError {
    #[error("host has {available_mib} MiB available, the start needs {needed_mib} MiB including {headroom_mib} MiB headroom")]
    Memory { available_mib: u64, needed_mib: u64, headroom_mib: u64 },
    #[error("port {0} is already in use on the host")]
    PortTaken(u16),
}

pub fn check(available_mib: u64, request_mib: u64, headroom_mib: u64, port: u16, port_free: bool) -> Result<(), PreflightError> {
    let needed = request_mib + headroom_mib;
    if available_mib < needed {
        return Err(PreflightError::Memory { available_mib, needed_mib: needed, headroom_mib });
    }
    if !port_free {
        return Err(PreflightError::PortTaken(port));
    }
    Ok(())
}

/// True if both a TCP listener and a UDP socket can bind the port on all
/// interfaces right now.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() && UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_on_paper_is_not_enough() {
        assert!(matches!(check(1000, 1024, 64, 1, true), Err(PreflightError::Memory { .. })));
        assert_eq!(check(2000, 1024, 64, 1, true), Ok(()));
        assert_eq!(check(2000, 1024, 64, 7, false), Err(PreflightError::PortTaken(7)));
    }

    #[test]
    fn a_bound_port_is_not_free() {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(!port_is_free(port));
        drop(l);
    }
}
