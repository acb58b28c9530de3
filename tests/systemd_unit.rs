//! The shipped unit's hardening (README "systemd" → "Hardening"): `systemd-analyze security`
//! rates it no worse than when the hardening was measured, and the directives it relies on are
//! there. `systemd-analyze verify` runs in tests/systemd.rs.
//!
//! Without `systemd-analyze` the test is skipped, loudly; under CI (`$CI` set), where .ci/run
//! installs systemd, it fails instead.

mod common;

use std::fs;
use std::process::Command;

use common::*;

/// The overall exposure `systemd-analyze security --offline=true` gave the unit when its
/// hardening was written (8.5 before it). Lower is better; loosening the unit past this fails.
const MEASURED_EXPOSURE: f64 = 6.4;

fn shipped_unit() -> String {
    fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/plumule.service"
    ))
    .expect("systemd/plumule.service")
}

#[test]
fn the_unit_is_not_more_exposed_than_measured() {
    let Some(analyze) = needed_program("systemd-analyze", "systemd") else {
        return;
    };
    let sb = Sandbox::new();
    // The binary under test stands in for /usr/local/bin/plumule, as in the verify test.
    let dir = sb.path("unit");
    fs::create_dir(&dir).expect("unit dir");
    let path = dir.join("plumule.service");
    fs::write(
        &path,
        shipped_unit().replace("/usr/local/bin/plumule", PLUMULE),
    )
    .expect("write the unit");
    let out = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze security");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze security failed ({}):\n{text}",
        out.status
    );
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    let exposure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"));
    assert!(
        exposure <= MEASURED_EXPOSURE,
        "the unit's exposure rose to {exposure} (measured {MEASURED_EXPOSURE}): a hardening \
         directive was dropped or loosened; if on purpose, say why in the unit and the README\n{text}"
    );
    // Each directive the README lists as applied is rated as such.
    for directive in [
        "ProtectKernelLogs=",
        "ProtectKernelModules=",
        "ProtectKernelTunables=",
        "ProtectControlGroups=",
        "RestrictSUIDSGID=",
        "PrivateMounts=",
        "SystemCallArchitectures=",
        "SystemCallFilter=~@module",
        "SystemCallFilter=~@reboot",
        "SystemCallFilter=~@swap",
        "RestrictAddressFamilies=~AF_PACKET",
        "CapabilityBoundingSet=~CAP_SYS_BOOT",
        "CapabilityBoundingSet=~CAP_SYS_TIME",
        "CapabilityBoundingSet=~CAP_SYSLOG",
    ] {
        let rated = text
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(directive))
            .unwrap_or_else(|| panic!("{directive} is not rated:\n{text}"));
        assert!(
            rated.trim_start().starts_with('✓'),
            "{directive} is not applied: {rated}"
        );
    }
}

/// What the unit keeps on purpose: the capabilities plumule itself needs are in the bounding
/// set (it only removes, `~`), and no directive that would stop `user`/`group` switching or
/// set-user-ID programs of workers crept in.
#[test]
fn the_unit_keeps_what_a_supervisor_needs() {
    let unit = shipped_unit();
    let directives: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    let bounding: Vec<&str> = directives
        .iter()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .collect();
    assert_eq!(bounding.len(), 1, "one bounding set line: {bounding:?}");
    let removed = bounding[0]
        .strip_prefix('~')
        .expect("the bounding set removes capabilities (~), it does not list them");
    for needed in [
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_KILL",
        "CAP_CHOWN",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_NICE",
    ] {
        assert!(
            !removed.split_whitespace().any(|c| c == needed),
            "the unit removes {needed}, which plumule needs"
        );
    }
    for absent in [
        "User=",
        "DynamicUser=",
        "PrivateUsers=",
        "NoNewPrivileges=",
        "MemoryDenyWriteExecute=",
        "RestrictNamespaces=",
    ] {
        assert!(
            !directives.iter().any(|l| l.starts_with(absent)),
            "the unit sets {absent}, which the README lists as left out on purpose"
        );
    }
}
