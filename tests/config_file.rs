//! `--config FILE` end to end: `blockrep serve` and `blockrep replica` take their defaults
//! from a TOML file, flags on the command line win, bad files are refused with a message
//! naming the key and the file, and the example configs in `systemd/examples` work.
//!
//! Every child process is killed when its guard drops and also (PR_SET_PDEATHSIG) when the
//! test thread that started it ends; every wait has a deadline.

mod common;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::process::{Command, Stdio};

use common::admin::{launch_admin, AdminNode, Scrape};
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_blockrep");

fn require_tools(tools: &[&str]) {
    for t in tools {
        require(t);
    }
}

// ---------------------------------------------------------------------------- --config

fn admin_volume_names(metrics: u16) -> BTreeSet<String> {
    Scrape::of(metrics)
        .0
        .iter()
        .filter_map(|s| s.labels.get("volume").cloned())
        .collect()
}

fn refused(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_err()
}

/// Runs blockrep with `args`, which must fail with exit 1 and a message containing every
/// one of `needles`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = run(Command::new("timeout")
        .args(["60", BIN])
        .args(args)
        .stdin(Stdio::null()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?}: {}\n{stderr}",
        out.status
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "{args:?}: stderr lacks {n:?}:\n{stderr}"
        );
    }
}

/// `--config FILE` for serve and replica: the file's dir/nbd/listen/metrics/volume-name are
/// used; a flag on the command line wins over the file; an unknown key (or a bad value) is an
/// error with exit 1 that names it; the example configs in systemd/examples work.
#[test]
fn config_file_sets_defaults_and_flags_override() {
    require_tools(&["timeout"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let store = create_store_sized(dir, "p", "32MiB");
    let (nbd, metrics) = (free_port(), free_port());
    let config = dir.join("p.toml");
    std::fs::write(
        &config,
        format!(
            "dir = \"{}\"\nnbd = [\"127.0.0.1:{nbd}\"]\nmetrics = \"127.0.0.1:{metrics}\"\nvolume-name = \"fromfile\"\n",
            store.display()
        ),
    )
    .unwrap();
    let cfg = config.display().to_string();

    // Everything from the file.
    let args = vec!["serve".to_string(), "--config".into(), cfg.clone()];
    let mut n = launch_admin("serve-file", &store, nbd, metrics, args);
    assert_eq!(nbd_greeting(nbd).as_deref(), Ok("NBDMAGIC"));
    assert_eq!(
        admin_volume_names(metrics),
        BTreeSet::from(["fromfile".to_string()])
    );
    assert_eq!(n.status()["store"], store.display().to_string());
    n.stop_ok();

    // Flags win: --nbd, --metrics, --volume-name, and the DIR argument over `dir`.
    let other_store = create_store_sized(dir, "q", "32MiB");
    let (nbd2, metrics2) = (free_port(), free_port());
    let args = vec![
        "serve".to_string(),
        other_store.display().to_string(),
        "--config".into(),
        cfg.clone(),
        "--nbd".into(),
        format!("127.0.0.1:{nbd2}"),
        "--metrics".into(),
        format!("127.0.0.1:{metrics2}"),
        "--volume-name".into(),
        "fromflag".into(),
    ];
    let mut n = launch_admin("serve-flags", &other_store, nbd2, metrics2, args);
    assert_eq!(nbd_greeting(nbd2).as_deref(), Ok("NBDMAGIC"));
    assert_eq!(
        admin_volume_names(metrics2),
        BTreeSet::from(["fromflag".to_string()])
    );
    assert_eq!(n.status()["store"], other_store.display().to_string());
    assert!(refused(nbd), "the file's NBD address must not be used");
    assert!(
        refused(metrics),
        "the file's metrics address must not be used"
    );
    n.stop_ok();

    // replica: a blank store of `size` in `dir`, on `listen`; --listen wins.
    let (listen, rmetrics, listen2) = (free_port(), free_port(), free_port());
    let rstore = dir.join("r");
    let rconfig = dir.join("r.toml");
    std::fs::write(
        &rconfig,
        format!(
            "dir = \"{}\"\nlisten = \"127.0.0.1:{listen}\"\nsize = \"32MiB\"\nmetrics = \"127.0.0.1:{rmetrics}\"\nvolume-name = \"repfile\"\n",
            rstore.display()
        ),
    )
    .unwrap();
    let rcfg = rconfig.display().to_string();
    let args = vec!["replica".to_string(), "--config".into(), rcfg.clone()];
    let mut r = launch_admin("replica-file", &rstore, listen, rmetrics, args);
    assert!(rstore.is_dir(), "the replica created its store from `size`");
    assert_eq!(
        admin_volume_names(rmetrics),
        BTreeSet::from(["repfile".to_string()])
    );
    r.stop_ok();
    let args = vec![
        "replica".to_string(),
        "--config".into(),
        rcfg.clone(),
        "--listen".into(),
        format!("127.0.0.1:{listen2}"),
    ];
    let mut r = launch_admin("replica-flags", &rstore, listen2, rmetrics, args);
    assert!(
        refused(listen),
        "the file's listen address must not be used"
    );
    r.stop_ok();

    // Unknown keys and bad values: exit 1, naming the key and the file.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        format!("dir = \"{}\"\ncolour = \"blue\"\n", store.display()),
    )
    .unwrap();
    let b = bad.display().to_string();
    fails_with(&["serve", "--config", &b], &["colour", &b]);
    fails_with(&["replica", "--config", &b], &["colour", &b]);
    std::fs::write(
        &bad,
        format!(
            "dir = \"{}\"\nflush-interval-ms = \"soon\"\n",
            store.display()
        ),
    )
    .unwrap();
    fails_with(&["serve", "--config", &b], &["flush-interval-ms", &b]);

    // The admin token and NBD bound keys reach the same checks as their flags.
    let short = dir.join("short-token");
    std::fs::write(&short, "too-short\n").unwrap();
    std::fs::write(
        &bad,
        format!(
            "dir = \"{}\"\nlisten = \"127.0.0.1:1\"\nadmin-token-file = \"{}\"\n",
            store.display(),
            short.display()
        ),
    )
    .unwrap();
    let short_name = short.display().to_string();
    fails_with(
        &["serve", "--config", &b],
        &["--admin-token-file", &short_name],
    );
    fails_with(
        &["replica", "--config", &b],
        &["--admin-token-file", &short_name],
    );
    std::fs::write(
        &bad,
        format!(
            "dir = \"{}\"\nnbd-memory-budget = \"512KiB\"\n",
            store.display()
        ),
    )
    .unwrap();
    fails_with(
        &["serve", "--config", &b],
        &["--nbd-memory-budget 524288 is too small"],
    );
    std::fs::write(
        &bad,
        format!(
            "dir = \"{}\"\nnbd-idle-timeout = \"never\"\n",
            store.display()
        ),
    )
    .unwrap();
    fails_with(&["serve", "--config", &b], &["nbd-idle-timeout", &b]);
    std::fs::write(
        &bad,
        format!("dir = \"{}\"\ncommit = \"sometimes\"\n", store.display()),
    )
    .unwrap();
    fails_with(&["serve", "--config", &b], &["commit", "sometimes"]);
    fails_with(
        &[
            "serve",
            "--config",
            &dir.join("missing.toml").display().to_string(),
        ],
        &["missing.toml"],
    );

    // The examples, pointed at loopback and temporary stores (nothing else changed): two
    // replicas from vol1.replica.toml, the primary from vol1.toml, all in sync.
    let example = |name: &str| -> toml::Table {
        read(&repo(&format!("systemd/examples/{name}")))
            .parse()
            .unwrap_or_else(|e| panic!("systemd/examples/{name}: {e}"))
    };
    let mut reps = Vec::new();
    for rname in ["r1", "r2"] {
        let mut t = example("vol1.replica.toml");
        let (l, m) = (free_port(), free_port());
        let store = dir.join(format!("ex-{rname}"));
        for (k, v) in [
            ("dir", store.display().to_string()),
            ("listen", format!("127.0.0.1:{l}")),
            ("metrics", format!("127.0.0.1:{m}")),
            ("size", "64MiB".to_string()),
        ] {
            assert!(t.contains_key(k), "vol1.replica.toml has no {k}");
            t.insert(k.into(), toml::Value::String(v));
        }
        let path = dir.join(format!("ex-{rname}.toml"));
        std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
        let args = vec![
            "replica".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        reps.push((rname, launch_admin(rname, &store, l, m, args)));
    }
    let mut t = example("vol1.toml");
    let pstore = create_store_sized(dir, "ex-p", "64MiB");
    let (pn, pm) = (free_port(), free_port());
    let replicas: Vec<toml::Value> = reps
        .iter()
        .map(|(name, r)| toml::Value::String(format!("{name}={}", r.addr())))
        .collect();
    for (k, v) in [
        ("dir", toml::Value::String(pstore.display().to_string())),
        (
            "nbd",
            toml::Value::Array(vec![toml::Value::String(format!("127.0.0.1:{pn}"))]),
        ),
        ("metrics", toml::Value::String(format!("127.0.0.1:{pm}"))),
        ("replica", toml::Value::Array(replicas)),
    ] {
        assert!(t.contains_key(k), "vol1.toml has no {k}");
        t.insert(k.into(), v);
    }
    let path = dir.join("ex-p.toml");
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    let args = vec![
        "serve".to_string(),
        "--config".into(),
        path.display().to_string(),
    ];
    let p = launch_admin("ex-p", &pstore, pn, pm, args);
    p.wait_replica_state("r1", "in_sync", 30);
    p.wait_replica_state("r2", "in_sync", 30);
    let st = p.status();
    assert_eq!(st["volume"], "vol1", "{st}");
    assert_eq!(st["commit_mode"], "sync-all", "{st}");
    for (_, r) in &reps {
        assert_eq!(r.status()["volume"], "vol1");
    }
}
