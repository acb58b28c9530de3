//! `include = ["conf.d/*.toml"]`: which files a pattern names.
//!
//! Rules, decided here (SPEC §2 leaves them open; supervisord's `[include]` is the model):
//! - only the main file includes; an included file holds `[program.*]` and `[queue.*]` tables
//!   only (no `[plumule]`, no `include` of its own), so the whole configuration is the main
//!   file and one level of included files;
//! - a pattern is relative to the main file's folder; `*` (any run of characters) and `?` (one
//!   character) may appear in its last component only, the file name; a name starting with a
//!   dot matches only a pattern starting with a dot, as in a shell;
//! - the files of a pattern are read in byte order of their names, patterns in the order
//!   written; a pattern without wildcards names a file that must exist, one with wildcards may
//!   match nothing (an empty or missing `conf.d`); what a wildcard matches that is not a
//!   regular file is skipped;
//! - a file named twice (by two patterns, or the main file matched by its own pattern) is read
//!   once;
//! - at most [`MAX_INCLUDED`] files.

use std::path::{Path, PathBuf};

use super::values::resolve;

/// The most files `include` may bring in: a pattern like `/*` must not read a whole disk.
pub(super) const MAX_INCLUDED: usize = 1000;

/// The files `pattern` names, in the order they are read; why not when it cannot be listed.
pub(super) fn expand(pattern: &str, dir: &Path) -> Result<Vec<PathBuf>, String> {
    if pattern.is_empty() {
        return Err("the pattern is empty".to_owned());
    }
    let full = resolve(dir, pattern);
    let (Some(folder), Some(name)) = (full.parent(), full.file_name()) else {
        return Err(format!("`{pattern}` names no file"));
    };
    if has_wildcard(&folder.to_string_lossy()) {
        return Err(format!(
            "wildcards (`*`, `?`) may only appear in the file name, not in a folder: `{pattern}`"
        ));
    }
    let name = name.to_string_lossy();
    if !has_wildcard(&name) {
        return Ok(vec![full]);
    }
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot list {}: {e}", folder.display())),
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", folder.display()))?;
        let file_name = entry.file_name();
        let candidate = file_name.to_string_lossy();
        if candidate.starts_with('.') && !name.starts_with('.') {
            continue;
        }
        if !matches(&name, &candidate) {
            continue;
        }
        // Symbolic links followed: a link to a file is a file.
        let path = entry.path();
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            found.push(path);
        }
    }
    found.sort_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
    Ok(found)
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters (the empty
/// one too) and `?` for exactly one. Linear backtracking: on a mismatch, the last `*` takes
/// one character more.
pub(super) fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = name.chars().collect();
    let (mut pi, mut si) = (0, 0);
    // The last `*` seen, and where in `name` its run ends for now.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == s[si])) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((star_pi, star_si)) = star {
            pi = star_pi + 1;
            si = star_si + 1;
            star = Some((star_pi, star_si + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_a_shell_on_one_component() {
        for (pattern, name, expected) in [
            ("*.toml", "web.toml", true),
            ("*.toml", ".toml", true),
            ("*.toml", "web.toml.bak", false),
            ("*", "", true),
            ("w?b.toml", "web.toml", true),
            ("w?b.toml", "wb.toml", false),
            ("*b*.toml", "abc.toml", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("?é.toml", "xé.toml", true),
            ("exact.toml", "exact.toml", true),
            ("exact.toml", "exact.tom", false),
        ] {
            assert_eq!(matches(pattern, name), expected, "{pattern} vs {name}");
        }
    }

    #[test]
    fn expansion_sorts_skips_hidden_files_and_folders() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf.d");
        std::fs::create_dir(&conf).unwrap();
        for name in ["b.toml", "a.toml", ".hidden.toml", "c.txt"] {
            std::fs::write(conf.join(name), "").unwrap();
        }
        std::fs::create_dir(conf.join("d.toml")).unwrap();
        let got = expand("conf.d/*.toml", dir.path()).unwrap();
        assert_eq!(got, [conf.join("a.toml"), conf.join("b.toml")]);
        assert_eq!(
            expand("conf.d/.*.toml", dir.path()).unwrap(),
            [conf.join(".hidden.toml")]
        );
        assert!(expand("missing/*.toml", dir.path()).unwrap().is_empty());
        assert_eq!(
            expand("conf.d/none.toml", dir.path()).unwrap(),
            [conf.join("none.toml")],
            "a plain name is kept: reading it says whether it exists"
        );
        let err = expand("*/x.toml", dir.path()).unwrap_err();
        assert!(err.contains("only appear in the file name"), "{err}");
        assert!(expand("", dir.path()).is_err());
    }
}
