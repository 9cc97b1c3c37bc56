//! Where a worker's gradient-ring listener binds and what address it gives its peers.
//!
//! The peers connect to the address the worker registers, so it must be one they can reach: not
//! 127.0.0.1 when they run on other machines, and never 0.0.0.0. By default the listener binds
//! the local IP this machine uses to reach the coordinator (127.0.0.1 for a coordinator on
//! loopback, the cluster network's interface for a remote one), which is also the interface the
//! peers, reaching the same coordinator, share. `--data-addr IP:PORT` picks both; with an
//! unspecified IP (`0.0.0.0:PORT`, `[::]:PORT`) the listener takes every interface and the
//! registered address is again the one toward the coordinator.

use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};

use anyhow::{anyhow, Context, Result};

/// The bound listener and the address registered for it.
pub struct RingListener {
    pub listener: TcpListener,
    pub advertised: SocketAddr,
}

/// Binds the ring listener: at `data_addr` when given, else on the IP toward the coordinator at
/// `coordinator_url` (any free port).
pub fn bind(data_addr: Option<&str>, coordinator_url: &str) -> Result<RingListener> {
    let bind_at: SocketAddr = match data_addr {
        Some(a) => a.parse().with_context(|| format!("--data-addr {a:?} is not IP:PORT (e.g. 10.0.0.5:0, or 0.0.0.0:7071)"))?,
        None => SocketAddr::new(ip_toward(coordinator_url)?, 0),
    };
    let listener =
        TcpListener::bind(bind_at).with_context(|| format!("binding the ring listener on {bind_at}"))?;
    let bound = listener.local_addr()?;
    let advertised = if bound.ip().is_unspecified() { SocketAddr::new(ip_toward(coordinator_url)?, bound.port()) } else { bound };
    Ok(RingListener { listener, advertised })
}

/// The local IP this machine's routing picks to reach the coordinator (a UDP socket "connected"
/// to it: no packet is sent), trying each address its host resolves to. A host name that
/// resolves to loopback although it names no loopback (Debian's `127.0.1.1 <hostname>` line in
/// /etc/hosts, on the coordinator's own machine) gives the address of the default route
/// instead: the one the other machines reach this one by.
pub fn ip_toward(coordinator_url: &str) -> Result<IpAddr> {
    let rest = coordinator_url.split_once("://").map_or(coordinator_url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let has_port = authority.rsplit_once(':').is_some_and(|(_, p)| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        && !authority.ends_with(']');
    let (host, target) = if has_port {
        (authority.rsplit_once(':').map_or(authority, |(h, _)| h), authority.to_string())
    } else {
        (authority, format!("{authority}:80"))
    };
    let resolved: Vec<SocketAddr> = target
        .to_socket_addrs()
        .with_context(|| format!("resolving the coordinator's host in {coordinator_url}"))?
        .collect();
    let mut last_err = None;
    for coordinator in &resolved {
        match route_from(*coordinator) {
            Ok(ip) if ip.is_loopback() && !names_loopback(host) => {
                return Ok(default_route_ip(coordinator.is_ipv4()).unwrap_or(ip));
            }
            Ok(ip) => return Ok(ip),
            Err(e) => last_err = Some(e),
        }
    }
    match last_err {
        Some(e) => Err(e.context(format!("no route from this machine to the coordinator in {coordinator_url}"))),
        None => Err(anyhow!("the coordinator's host in {coordinator_url} resolves to no address")),
    }
}

/// A host part that means this machine by name or literal: loopback is the right ring address.
fn names_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn route_from(to: SocketAddr) -> Result<IpAddr> {
    let local: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let probe = UdpSocket::bind(local)?;
    probe.connect(to).with_context(|| format!("no route to {to}"))?;
    Ok(probe.local_addr()?.ip())
}

/// This machine's address on its default route (a documentation address as the target: a UDP
/// "connect" sends nothing), if it has one.
fn default_route_ip(v4: bool) -> Option<IpAddr> {
    let to: SocketAddr = if v4 { "192.0.2.1:9" } else { "[2001:db8::1]:9" }.parse().ok()?;
    route_from(to).ok().filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;


    #[test]
    fn a_coordinator_on_loopback_gives_a_loopback_ring() {
        for url in ["http://127.0.0.1:7070", "http://localhost:7070/", "127.0.0.1:7070", "https://user@127.0.0.1"] {
            assert!(ip_toward(url).unwrap().is_loopback(), "{url}");
        }
        let r = bind(None, "http://127.0.0.1:7070").unwrap();
        assert!(r.advertised.ip().is_loopback() && r.advertised.port() != 0);
        assert_eq!(r.listener.local_addr().unwrap(), r.advertised);
    }

    #[test]
    fn a_remote_coordinator_gives_the_interface_toward_it_never_an_unspecified_ip() {
        let Some(ip) = default_route_ip(true) else {
            eprintln!("skipping: this machine has no default route");
            return;
        };
        // The coordinator reached at this machine's own network address: the ring goes there
        // too, where peers on other machines can reach it.
        let url = format!("http://{ip}:7070");
        assert_eq!(ip_toward(&url).unwrap(), ip);
        let r = bind(None, &url).unwrap();
        assert_eq!(r.advertised.ip(), ip);
        // Every interface bound, the route's address registered.
        let any = bind(Some("0.0.0.0:0"), &url).unwrap();
        assert!(any.listener.local_addr().unwrap().ip().is_unspecified());
        assert_eq!((any.advertised.ip(), any.advertised.port()), (ip, any.listener.local_addr().unwrap().port()));
        // An explicit address is kept as given.
        let exact = bind(Some("127.0.0.1:0"), &url).unwrap();
        assert!(exact.advertised.ip().is_loopback());
    }

    #[test]
    fn a_name_that_resolves_to_loopback_but_names_no_loopback_gives_the_default_route() {
        let Some(ip) = default_route_ip(true) else {
            eprintln!("skipping: this machine has no default route");
            return;
        };
        // A loopback literal or "localhost" is taken as meant; a host name is not, whatever
        // /etc/hosts maps it to ("127.0.1.1 <hostname>", as Debian writes it).
        assert!(names_loopback("localhost") && names_loopback("127.0.0.1") && names_loopback("127.0.1.1") && names_loopback("[::1]"));
        assert!(!names_loopback("node17") && !names_loopback("10.0.0.5"));
        assert!(ip_toward("http://127.0.1.1:7070").unwrap().is_loopback());
        let hosts_line = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
        let resolves_to_loopback = format!("{host}:1").to_socket_addrs().is_ok_and(|mut a| a.all(|a| a.ip().is_loopback()));
        if !host.is_empty() && resolves_to_loopback {
            assert_eq!(ip_toward(&format!("http://{host}:7070")).unwrap(), ip, "/etc/hosts:\n{hosts_line}");
        }
    }

    #[test]
    fn bad_addresses_are_named() {
        let e = bind(Some("10.0.0.5"), "http://127.0.0.1:7070").err().unwrap().to_string();
        assert!(e.contains("--data-addr \"10.0.0.5\" is not IP:PORT"), "{e}");
        let e = format!("{:#}", ip_toward("http://no-such-host.invalid:7070").unwrap_err());
        assert!(e.contains("resolving the coordinator's host in http://no-such-host.invalid:7070"), "{e}");
    }
}
