//! Static guest network setup with the classic interface ioctls (no netlink dependency): brings
//! up loopback and the configured interface, assigns its address and adds the default route.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use microbox_agent_proto::BootNetwork;

/// Parses "a.b.c.d/len".
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("address {s:?} is not of the form a.b.c.d/len"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("address {s:?}: {addr:?} is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("address {s:?}: prefix length {len:?} is not 0-32"))?;
    Ok((addr, len))
}

fn netmask(len: u8) -> Ipv4Addr {
    let bits = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    Ipv4Addr::from(bits)
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr is plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> Result<libc::ifreq, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("interface name {name:?} is empty or too long"));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn ioctl(
    sock: &OwnedFd,
    req: libc::Ioctl,
    arg: *mut libc::c_void,
    what: &str,
) -> Result<(), String> {
    // SAFETY: `arg` points at a live ifreq/rtentry of the type `req` expects.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), req, arg) };
    if rc < 0 {
        return Err(format!("{what}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn set_up(sock: &OwnedFd, name: &str) -> Result<(), String> {
    let mut r = ifreq(name)?;
    ioctl(
        sock,
        libc::SIOCGIFFLAGS,
        (&mut r as *mut libc::ifreq).cast(),
        &format!("reading flags of {name}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ioctl(
        sock,
        libc::SIOCSIFFLAGS,
        (&mut r as *mut libc::ifreq).cast(),
        &format!("bringing {name} up"),
    )
}

fn socket() -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2) call; the result is checked before being owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket(AF_INET): {}", io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Brings up `lo` (always useful for workloads).
pub fn loopback_up() -> Result<(), String> {
    set_up(&socket()?, "lo")
}

/// Configures `net.interface` as asked.
pub fn configure(net: &BootNetwork) -> Result<(), String> {
    let (addr, len) = parse_cidr(&net.address_cidr)?;
    let sock = socket()?;
    let name = net.interface.as_str();
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl(
        &sock,
        libc::SIOCSIFADDR,
        (&mut r as *mut libc::ifreq).cast(),
        &format!("setting address {addr} on {name}"),
    )?;
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_netmask = sockaddr_in(netmask(len));
    ioctl(
        &sock,
        libc::SIOCSIFNETMASK,
        (&mut r as *mut libc::ifreq).cast(),
        &format!("setting netmask /{len} on {name}"),
    )?;
    set_up(&sock, name)?;
    if !net.gateway.is_empty() {
        let gw: Ipv4Addr = net
            .gateway
            .parse()
            .map_err(|_| format!("gateway {:?} is not an IPv4 address", net.gateway))?;
        let dev = CString::new(name).map_err(|_| "interface name contains NUL".to_string())?;
        // SAFETY: rtentry is plain old data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
        ioctl(
            &sock,
            libc::SIOCADDRT,
            (&mut rt as *mut libc::rtentry).cast(),
            &format!("adding default route via {gw}"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            parse_cidr("10.0.2.15/24").unwrap(),
            ("10.0.2.15".parse().unwrap(), 24)
        );
        assert!(parse_cidr("10.0.2.15").unwrap_err().contains("a.b.c.d/len"));
        assert!(parse_cidr("10.0.2.15/33")
            .unwrap_err()
            .contains("prefix length"));
        assert!(parse_cidr("nope/8").unwrap_err().contains("IPv4"));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }
}
