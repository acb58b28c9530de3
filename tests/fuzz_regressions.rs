//! Every fuzz target's committed inputs, replayed under `cargo test` through the very checks
//! the targets run (`invariants::targets`): the hand-written seeds (`fuzz/corpus/NAME/seed-*`)
//! and each input that once made a target fail (`fuzz/regressions/NAME/*`), kept after the fix.
//! The fixes themselves have named unit tests beside the code (`fuzz_regression_*`).

mod invariants;

use std::fs;
use std::path::{Path, PathBuf};

use invariants::targets;

/// The files of `dir` whose names start with `prefix`, sorted; none when `dir` is absent.
fn inputs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    files.sort();
    files
}

fn replay(name: &str, check: targets::Check, files: &[PathBuf]) {
    for path in files {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let run = std::panic::catch_unwind(|| check(&data));
        assert!(
            run.is_ok(),
            "fuzz target {name} fails on {}",
            path.display()
        );
    }
}

#[test]
fn every_target_passes_its_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for &(name, check) in targets::ALL {
        let seeds = inputs(&root.join("corpus").join(name), "seed-");
        assert!(!seeds.is_empty(), "fuzz target {name} has no seeds");
        replay(name, check, &seeds);
    }
}

#[test]
fn every_input_that_once_failed_a_target_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for &(name, check) in targets::ALL {
        let files = inputs(&root.join("regressions").join(name), "");
        replayed += files.len();
        replay(name, check, &files);
    }
    assert!(
        replayed > 0,
        "no regressions found under {}",
        root.display()
    );
}

/// The list of targets is the fuzz crate's: a target added there is replayed here too.
#[test]
fn every_fuzz_target_is_replayed() {
    let manifest =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml")).unwrap();
    let mut declared: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|&n| n != "plumule-fuzz")
        .collect();
    declared.sort_unstable();
    let replayed: Vec<&str> = targets::ALL.iter().map(|&(n, _)| n).collect();
    assert_eq!(declared, replayed);
}
