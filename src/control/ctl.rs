//! `blockrep ctl`: an operator's view of a volume in etcd and the requests that move its
//! leadership, in the manner of `patronictl`. It never leads or fences anything itself: it
//! writes a request the nodes act on, then watches the leader key for the outcome.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockrep_control::record::{encode, MemberRecord, MemberState, SwitchoverRequest, VolumeView};
use blockrep_control::{Compare, Keys, Txn, View};
use clap::{Args, Subcommand};
use serde_json::json;
use thiserror::Error;

use super::args::EtcdArgs;
use super::etcd::{leases_by_key, Etcd, LeaseId, WatchEvent};

#[derive(Args, Debug)]
pub struct CtlArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// The volume's members: role, state, epoch, position, lag, in-sync, lease left.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Hand leadership from the current leader to an in-sync member, losing nothing.
    Switchover {
        #[arg(long, value_name = "NODE")]
        to: String,
        /// Seconds to wait for the target to lead (0: write the request and return).
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        wait: u64,
    },
    /// Name the node to take over a volume that has no leader.
    Failover {
        #[arg(long, value_name = "NODE")]
        to: String,
        /// Promote it even if it is not a ready, in-sync member: it may lack acknowledged
        /// writes, which are then lost.
        #[arg(long)]
        force: bool,
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        wait: u64,
    },
}

/// Why `ctl` will not write a request: each names what to do instead.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    #[error(
        "volume {volume} has no leader: a switchover hands over from one; use `failover --to {to}`"
    )]
    NoLeader { volume: String, to: String },
    #[error("volume {volume} has a leader ({leader}): use `switchover --to {to}`")]
    HasLeader {
        volume: String,
        leader: String,
        to: String,
    },
    #[error("{0} already leads")]
    AlreadyLeads(String),
    #[error("{0} is not a live member (no member key: is `blockrep node --name {0}` running?)")]
    NotMember(String),
    #[error("{name} is {state}, not ready: it could not serve the whole volume (--force overrides, for a failover)")]
    NotReady { name: String, state: String },
    #[error("{0} is not in the in-sync set: it may lack acknowledged writes (--force overrides, for a failover)")]
    NotInSync(String),
    #[error("{0} runs with --nofailover")]
    NoFailover(String),
}

pub fn run(args: CtlArgs) -> Result<()> {
    args.etcd.validate()?;
    let keys = args.etcd.keys()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let etcd = Etcd::connect(&args.etcd).await?;
        match args.command {
            CtlCommand::List { json } => list(&etcd, &keys, &args.etcd.volume, json).await,
            CtlCommand::Switchover { to, wait } => {
                let request =
                    |view: &VolumeView| check_switchover(view, &keys, &args.etcd.volume, &to);
                hand_over(&etcd, &keys, &to, wait, request).await
            }
            CtlCommand::Failover { to, force, wait } => {
                let request =
                    |view: &VolumeView| check_failover(view, &keys, &args.etcd.volume, &to, force);
                hand_over(&etcd, &keys, &to, wait, request).await
            }
        }
    })
}

async fn read_volume(etcd: &Etcd, keys: &Keys) -> Result<(View, VolumeView)> {
    let view = etcd.read(keys).await?;
    let parsed = VolumeView::parse(keys, &view)?;
    Ok((view, parsed))
}

/// Whether `name` may be the target of a planned switchover; the request to write if so.
pub fn check_switchover(
    view: &VolumeView,
    keys: &Keys,
    volume: &str,
    to: &str,
) -> Result<(SwitchoverRequest, Compare), Refusal> {
    let Some(leader) = &view.leader else {
        return Err(Refusal::NoLeader {
            volume: volume.to_string(),
            to: to.to_string(),
        });
    };
    if leader.value.name == to {
        return Err(Refusal::AlreadyLeads(to.to_string()));
    }
    check_candidate(view, to, false)?;
    let request = SwitchoverRequest {
        to: to.to_string(),
        from: Some(leader.value.name.clone()),
        failover: false,
        force: false,
    };
    // Only if the leader it was checked against still holds the key.
    Ok((
        request,
        Compare::ModRevision(keys.leader(), leader.mod_revision),
    ))
}

/// Whether `name` may be named to take over a leaderless volume.
pub fn check_failover(
    view: &VolumeView,
    keys: &Keys,
    volume: &str,
    to: &str,
    force: bool,
) -> Result<(SwitchoverRequest, Compare), Refusal> {
    if let Some(leader) = &view.leader {
        return Err(Refusal::HasLeader {
            volume: volume.to_string(),
            leader: leader.value.name.clone(),
            to: to.to_string(),
        });
    }
    check_candidate(view, to, force)?;
    let request = SwitchoverRequest {
        to: to.to_string(),
        from: None,
        failover: true,
        force,
    };
    Ok((request, Compare::Absent(keys.leader())))
}

fn check_candidate(view: &VolumeView, to: &str, force: bool) -> Result<(), Refusal> {
    let Some(member) = view.members.get(to) else {
        return Err(Refusal::NotMember(to.to_string()));
    };
    if force {
        return Ok(());
    }
    if member.state != MemberState::Ready {
        return Err(Refusal::NotReady {
            name: to.to_string(),
            state: state_name(member.state).to_string(),
        });
    }
    if member.nofailover {
        return Err(Refusal::NoFailover(to.to_string()));
    }
    let in_sync = view.insync.as_ref().is_some_and(|s| s.value.contains(to));
    if !in_sync {
        return Err(Refusal::NotInSync(to.to_string()));
    }
    Ok(())
}

/// Checks the target, writes the request guarded on the leader key as it was read, and waits
/// up to `wait` seconds for the leader key to name the target.
async fn hand_over(
    etcd: &Etcd,
    keys: &Keys,
    to: &str,
    wait: u64,
    check: impl Fn(&VolumeView) -> Result<(SwitchoverRequest, Compare), Refusal>,
) -> Result<()> {
    let (_, view) = read_volume(etcd, keys).await?;
    let (request, guard) = check(&view)?;
    let value = encode(&request);
    let txn = Txn::default()
        .when(guard)
        .put(keys.switchover(), value.clone());
    if !etcd.txn(&txn, None).await? {
        bail!("the leader changed while the request was being written; look again with `list`");
    }
    let what = if request.failover {
        "failover"
    } else {
        "switchover"
    };
    let from = request.from.as_deref().unwrap_or("no leader");
    println!("{what}: asked {to} to take over from {from}");
    if wait == 0 {
        return Ok(());
    }
    let deadline = Duration::from_secs(wait);
    match wait_for_leader(etcd, keys, to, view.revision, deadline).await? {
        Some(epoch) => {
            withdraw(etcd, keys, &value).await?;
            println!("{what}: {to} leads at epoch {epoch}");
            Ok(())
        }
        None => {
            withdraw(etcd, keys, &value).await?;
            let (_, now) = read_volume(etcd, keys).await?;
            let leader = now.leader_name().unwrap_or("nobody").to_string();
            bail!("{to} did not take over within {wait}s (leader: {leader}); the request was withdrawn")
        }
    }
}

/// Deletes the request if it is still ours (the new leader normally consumes it), so a
/// stale request cannot move leadership later.
async fn withdraw(etcd: &Etcd, keys: &Keys, value: &[u8]) -> Result<()> {
    let txn = Txn::default()
        .when(Compare::Value(keys.switchover(), value.to_vec()))
        .delete(keys.switchover());
    etcd.txn(&txn, None).await?;
    Ok(())
}

/// The epoch `to` leads at, once the leader key names it; None if `deadline` passes first.
async fn wait_for_leader(
    etcd: &Etcd,
    keys: &Keys,
    to: &str,
    after: i64,
    deadline: Duration,
) -> Result<Option<u64>> {
    let end = Instant::now() + deadline;
    let mut watch = etcd.watch(keys, after);
    loop {
        match read_volume(etcd, keys).await {
            Ok((_, view)) => {
                if let Some(l) = view.leader.as_ref().filter(|l| l.value.name == to) {
                    return Ok(Some(l.value.epoch));
                }
            }
            // etcd may be briefly unreachable mid-handover (the caller has a deadline).
            Err(e) => tracing::warn!("reading the volume: {e:#}"),
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match tokio::time::timeout(left, watch.next()).await {
            Err(_) | Ok(None) => return Ok(None),
            Ok(Some(WatchEvent::Failed(e))) => tracing::warn!("watching the volume: {e}"),
            Ok(Some(WatchEvent::Changed { .. })) => {}
        }
    }
}

fn state_name(state: MemberState) -> &'static str {
    match state {
        MemberState::Starting => "starting",
        MemberState::Rebuilding => "rebuilding",
        MemberState::Ready => "ready",
    }
}

/// One row of `list`.
struct Row {
    name: String,
    record: Option<MemberRecord>,
    leader: bool,
    in_sync: bool,
    lag: Option<u64>,
    lease_left: Option<Duration>,
}

async fn list(etcd: &Etcd, keys: &Keys, volume: &str, as_json: bool) -> Result<()> {
    let (raw, view) = read_volume(etcd, keys).await?;
    let leases = leases_by_key(&raw);
    let leader = view.leader_name().map(str::to_string);
    let leader_head = leader
        .as_ref()
        .and_then(|l| view.members.get(l))
        .map(|m| m.head);
    let insync = view.insync.as_ref().map(|s| &s.value);
    let mut names: Vec<String> = view.members.keys().cloned().collect();
    // In-sync members whose key has vanished are the ones an operator most needs to see.
    for name in insync.iter().flat_map(|s| s.members.iter()) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    let mut rows = Vec::new();
    for name in names {
        let record = view.members.get(&name).cloned();
        let lease_left = match leases.get(&keys.member(&name)) {
            Some(lease) => ttl_left(etcd, *lease).await?,
            None => None,
        };
        rows.push(Row {
            leader: leader.as_deref() == Some(&name),
            in_sync: insync.is_some_and(|s| s.contains(&name)),
            lag: record
                .as_ref()
                .zip(leader_head)
                .map(|(r, head)| head.saturating_sub(r.head)),
            lease_left,
            record,
            name,
        });
    }
    let leader_lease = match leases.get(&keys.leader()) {
        Some(lease) => ttl_left(etcd, *lease).await?,
        None => None,
    };
    if as_json {
        println!("{}", render_json(volume, &view, &rows, leader_lease));
    } else {
        print!("{}", render_table(volume, &view, &rows, leader_lease));
    }
    Ok(())
}

async fn ttl_left(etcd: &Etcd, lease: LeaseId) -> Result<Option<Duration>> {
    Ok(etcd.ttl_left(lease).await?)
}

fn render_json(
    volume: &str,
    view: &VolumeView,
    rows: &[Row],
    leader_lease: Option<Duration>,
) -> serde_json::Value {
    let members: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let m = r.record.as_ref();
            json!({
                "name": r.name,
                "live": m.is_some(),
                "role": m.map(|m| m.role),
                "state": m.map(|m| m.state),
                "epoch": m.map(|m| m.epoch),
                "head": m.map(|m| m.head),
                "head_epoch": m.map(|m| m.head_epoch),
                "committed": m.map(|m| m.committed),
                "lag": r.lag,
                "priority": m.map(|m| m.priority),
                "nofailover": m.map(|m| m.nofailover),
                "in_sync": r.in_sync,
                "leader": r.leader,
                "lease_ttl_s": r.lease_left.map(|d| d.as_secs()),
                "replication": m.map(|m| m.replication.clone()),
                "nbd": m.map(|m| m.nbd.clone()),
                "admin": m.and_then(|m| m.admin.clone()),
            })
        })
        .collect();
    json!({
        "volume": volume,
        "revision": view.revision,
        "leader": view.leader.as_ref().map(|l| json!({
            "name": l.value.name,
            "epoch": l.value.epoch,
            "lease_ttl_s": leader_lease.map(|d| d.as_secs()),
        })),
        "epoch_counter": view.epoch_counter.as_ref().map(|c| c.value),
        "insync": view.insync.as_ref().map(|s| &s.value),
        "switchover": view.switchover.as_ref().map(|s| &s.value),
        "identity": view.identity,
        "members": members,
    })
}

fn render_table(
    volume: &str,
    view: &VolumeView,
    rows: &[Row],
    leader_lease: Option<Duration>,
) -> String {
    let dash = || "-".to_string();
    let mut out = match &view.leader {
        Some(l) => format!(
            "volume {volume}: leader {} at epoch {} (lease {})\n",
            l.value.name,
            l.value.epoch,
            leader_lease.map_or_else(dash, |d| format!("{}s", d.as_secs()))
        ),
        None => format!("volume {volume}: no leader\n"),
    };
    if let Some(s) = &view.switchover {
        out.push_str(&format!(
            "pending {}: to {}{}\n",
            if s.value.failover {
                "failover"
            } else {
                "switchover"
            },
            s.value.to,
            if s.value.force { " (forced)" } else { "" }
        ));
    }
    let header = [
        "", "MEMBER", "ROLE", "STATE", "EPOCH", "HEAD", "LAG", "PRIORITY", "IN-SYNC", "LEASE",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        let m = r.record.as_ref();
        cells.push(vec![
            if r.leader { "*" } else { "" }.to_string(),
            r.name.clone(),
            m.map_or_else(dash, |m| {
                serde_json::to_value(m.role)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            }),
            m.map_or_else(|| "gone".to_string(), |m| state_name(m.state).to_string()),
            m.map_or_else(dash, |m| m.epoch.to_string()),
            m.map_or_else(dash, |m| m.head.to_string()),
            r.lag.map_or_else(dash, |l| l.to_string()),
            m.map_or_else(dash, |m| {
                let nofailover = if m.nofailover { " nofailover" } else { "" };
                format!("{}{nofailover}", m.priority)
            }),
            if r.in_sync { "yes" } else { "no" }.to_string(),
            r.lease_left
                .map_or_else(dash, |d| format!("{}s", d.as_secs())),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| cells.iter().map(|row| row[c].len()).max().unwrap_or(0))
        .collect();
    for row in cells {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockrep_control::record::{InSync, LeaderRecord, MemberRole, Versioned};

    fn keys() -> Keys {
        Keys::new("/blockrep", "vol").unwrap()
    }

    fn member(name: &str, state: MemberState) -> MemberRecord {
        MemberRecord {
            name: name.into(),
            volume_id: "id".into(),
            role: MemberRole::Replica,
            state,
            epoch: 3,
            head: 10,
            head_epoch: 3,
            committed: 10,
            priority: 0,
            nofailover: false,
            replication: "127.0.0.1:1".into(),
            nbd: vec![],
            admin: None,
        }
    }

    fn view(leader: Option<&str>, insync: &[&str]) -> VolumeView {
        let mut v = VolumeView::default();
        for (name, state) in [
            ("n1", MemberState::Ready),
            ("n2", MemberState::Ready),
            ("n3", MemberState::Rebuilding),
            ("n4", MemberState::Ready),
        ] {
            v.members.insert(name.into(), member(name, state));
        }
        v.leader = leader.map(|name| Versioned {
            value: LeaderRecord {
                name: name.into(),
                epoch: 3,
            },
            mod_revision: 7,
        });
        v.insync = Some(Versioned {
            value: InSync {
                epoch: 3,
                leader: "n1".into(),
                members: insync.iter().map(|s| s.to_string()).collect(),
            },
            mod_revision: 8,
        });
        v
    }

    #[test]
    fn a_switchover_goes_only_to_a_ready_in_sync_member_other_than_the_leader() {
        let v = view(Some("n1"), &["n1", "n2", "n3"]);
        let (req, guard) = check_switchover(&v, &keys(), "vol", "n2").unwrap();
        assert_eq!(req.from.as_deref(), Some("n1"));
        assert!(!req.failover && !req.force);
        assert!(matches!(guard, Compare::ModRevision(_, 7)));
        assert_eq!(
            check_switchover(&v, &keys(), "vol", "n1"),
            Err(Refusal::AlreadyLeads("n1".into()))
        );
        assert!(matches!(
            check_switchover(&v, &keys(), "vol", "n3"),
            Err(Refusal::NotReady { .. })
        ));
        assert_eq!(
            check_switchover(&v, &keys(), "vol", "n4"),
            Err(Refusal::NotInSync("n4".into()))
        );
        assert_eq!(
            check_switchover(&v, &keys(), "vol", "n9"),
            Err(Refusal::NotMember("n9".into()))
        );
        let mut nofail = v.clone();
        if let Some(m) = nofail.members.get_mut("n2") {
            m.nofailover = true;
        }
        assert_eq!(
            check_switchover(&nofail, &keys(), "vol", "n2"),
            Err(Refusal::NoFailover("n2".into()))
        );
        let leaderless = view(None, &["n1", "n2"]);
        assert!(matches!(
            check_switchover(&leaderless, &keys(), "vol", "n2"),
            Err(Refusal::NoLeader { .. })
        ));
    }

    #[test]
    fn a_failover_needs_no_leader_and_force_to_skip_the_in_sync_rule() {
        let v = view(None, &["n1", "n2"]);
        let (req, guard) = check_failover(&v, &keys(), "vol", "n2", false).unwrap();
        assert!(req.failover && req.from.is_none());
        assert!(matches!(guard, Compare::Absent(_)));
        assert_eq!(
            check_failover(&v, &keys(), "vol", "n4", false),
            Err(Refusal::NotInSync("n4".into()))
        );
        assert!(check_failover(&v, &keys(), "vol", "n4", true).is_ok_and(|(r, _)| r.force));
        assert!(check_failover(&v, &keys(), "vol", "n3", true).is_ok());
        assert_eq!(
            check_failover(&v, &keys(), "vol", "n9", true),
            Err(Refusal::NotMember("n9".into()))
        );
        let led = view(Some("n1"), &["n1", "n2"]);
        assert!(matches!(
            check_failover(&led, &keys(), "vol", "n2", true),
            Err(Refusal::HasLeader { .. })
        ));
    }
}
