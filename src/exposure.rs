//! What each of a node's ports lets in from other hosts: at start, one warning per port
//! that is reachable beyond this host without protection, naming the flag that fixes it.
//! Loopback addresses and Unix sockets are local; anything else (the unspecified 0.0.0.0 and
//! `::`, another interface's address, a host name other than `localhost`) is exposed.

use std::net::{IpAddr, SocketAddr};

/// A port, with what protects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port<'a> {
    /// An NBD listener; `tls` when clients must (or may) use TLS (`--tls on|require`).
    Nbd { tls: bool },
    /// A replica's replication listener (`--listen`).
    Replication { peer_tls: bool },
    /// A primary's connection to replica `name` (`--replica NAME=HOST:PORT`).
    ReplicaPeer { name: &'a str, peer_tls: bool },
    /// The admin endpoint (`--metrics`): plain HTTP, never encrypted; `token` when its `PUT`
    /// is enabled by `--admin-token-file`.
    Admin { token: bool },
}

/// Where an address reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only this host: loopback, `localhost`, a Unix socket.
    Local,
    /// Other hosts may connect.
    Exposed,
}

/// Where `addr` reaches: `HOST:PORT`, `[V6]:PORT`, a bare IP or host name, or `unix:PATH`.
pub fn reach(addr: &str) -> Reach {
    if addr.starts_with("unix:") || addr.starts_with('/') {
        return Reach::Local;
    }
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return ip_reach(sa.ip());
    }
    let host = if let Some(bracketed) = addr.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else if addr.matches(':').count() == 1 {
        addr.split(':').next().unwrap_or_default()
    } else {
        // No port, or a bare IPv6 address (its colons are its own).
        addr
    };
    match host.parse::<IpAddr>() {
        Ok(ip) => ip_reach(ip),
        Err(_) if host.eq_ignore_ascii_case("localhost") => Reach::Local,
        // Any other name may resolve to anything; only loopback is known to be local.
        Err(_) => Reach::Exposed,
    }
}

fn ip_reach(ip: IpAddr) -> Reach {
    if ip.to_canonical().is_loopback() {
        Reach::Local
    } else {
        Reach::Exposed
    }
}

/// The warning for `port` bound to (or reaching) `addr`, if it needs one.
pub fn warning(port: Port<'_>, addr: &str) -> Option<String> {
    if reach(addr) == Reach::Local {
        return None;
    }
    match port {
        Port::Nbd { tls: true }
        | Port::Replication { peer_tls: true }
        | Port::ReplicaPeer { peer_tls: true, .. } => None,
        Port::Nbd { tls: false } => Some(format!(
            "NBD on {addr} is reachable from other hosts without TLS: anyone who reaches it \
             reads and writes the volume in the clear; use --tls require --tls-certificates DIR \
             (or bind --nbd to 127.0.0.1)"
        )),
        Port::Replication { peer_tls: false } => Some(format!(
            "the replication port {addr} is reachable from other hosts without TLS: anyone who \
             reaches it can act as this replica's primary; use --peer-tls-dir DIR (or bind \
             --listen to 127.0.0.1)"
        )),
        Port::ReplicaPeer {
            name,
            peer_tls: false,
        } => Some(format!(
            "replica {name} at {addr} is reached over the network without TLS: the volume's \
             data crosses it in the clear to a peer nobody authenticated; use --peer-tls-dir DIR"
        )),
        Port::Admin { token } => Some(format!(
            "the admin endpoint on {addr} is reachable from other hosts and is plain HTTP (never \
             encrypted): anyone who reaches it reads /metrics and /v1/status{}; bind --metrics to \
             127.0.0.1 (or firewall it)",
            if token {
                ", and the --admin-token-file token crosses the network in the clear"
            } else {
                "; its PUT (set-address) is disabled (no --admin-token-file)"
            }
        )),
    }
}

/// Logs, once at start, the warning of each exposed address of `port`.
pub fn warn_exposed(port: Port<'_>, addrs: &[String]) {
    for addr in addrs {
        if let Some(w) = warning(port, addr) {
            tracing::warn!("exposed: {w}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_unix_sockets_are_local() {
        for a in [
            "127.0.0.1:10809",
            "127.1.2.3:1",
            "127.0.0.1",
            "[::1]:9810",
            "[::1]",
            "::1",
            "[::ffff:127.0.0.1]:80",
            "localhost:10809",
            "LOCALHOST",
            "unix:/run/blockrep.sock",
            "/run/blockrep.sock",
        ] {
            assert_eq!(reach(a), Reach::Local, "{a}");
        }
    }

    #[test]
    fn unspecified_other_interfaces_and_host_names_are_exposed() {
        for a in [
            "0.0.0.0:10809",
            "0.0.0.0",
            "[::]:10809",
            "::",
            "10.0.0.2:10900",
            "192.168.1.5",
            "[2001:db8::1]:10900",
            "2001:db8::1",
            "[::ffff:10.0.0.1]:1",
            "db1.example.com:10900",
            "db1:10900",
        ] {
            assert_eq!(reach(a), Reach::Exposed, "{a}");
        }
    }

    #[test]
    fn local_ports_never_warn() {
        for port in [
            Port::Nbd { tls: false },
            Port::Replication { peer_tls: false },
            Port::ReplicaPeer {
                name: "r1",
                peer_tls: false,
            },
            Port::Admin { token: false },
            Port::Admin { token: true },
        ] {
            assert_eq!(warning(port, "127.0.0.1:1"), None, "{port:?}");
            assert_eq!(warning(port, "unix:/x.sock"), None, "{port:?}");
        }
    }

    #[test]
    fn exposed_ports_warn_unless_protected_naming_the_fix() {
        let w = |port| warning(port, "0.0.0.0:1");
        assert_eq!(w(Port::Nbd { tls: true }), None);
        assert_eq!(w(Port::Replication { peer_tls: true }), None);
        assert_eq!(
            w(Port::ReplicaPeer {
                name: "r1",
                peer_tls: true
            }),
            None
        );
        let nbd = w(Port::Nbd { tls: false }).expect("NBD warns");
        assert!(nbd.contains("--tls require"), "{nbd}");
        let repl = w(Port::Replication { peer_tls: false }).expect("replication warns");
        assert!(repl.contains("--peer-tls-dir"), "{repl}");
        let peer = w(Port::ReplicaPeer {
            name: "r1",
            peer_tls: false,
        })
        .expect("a replica peer warns");
        assert!(
            peer.contains("r1") && peer.contains("--peer-tls-dir"),
            "{peer}"
        );
    }

    #[test]
    fn an_exposed_admin_endpoint_always_warns_and_says_whether_put_is_disabled() {
        let open = warning(Port::Admin { token: false }, "[::]:9810").expect("admin warns");
        assert!(
            open.contains("--metrics") && open.contains("disabled"),
            "{open}"
        );
        let token = warning(Port::Admin { token: true }, "[::]:9810").expect("admin warns");
        assert!(
            token.contains("--metrics") && token.contains("in the clear"),
            "{token}"
        );
        assert!(!token.contains("disabled"), "{token}");
    }
}
