//! Parsers for the value syntaxes of the file: durations, sizes, signals, octal modes, names and
//! listen addresses. Each returns the message to show when the value is wrong.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::raw::Scalar;
use super::{ListenAddr, MAX_DURATION};

/// What is wrong with a value, in words. The validator places it at the value's location in
/// the file (hence no key or path here) and reports it with the file's other problems.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(super) struct Invalid(String);

impl From<Invalid> for String {
    fn from(e: Invalid) -> String {
        e.0
    }
}

/// The closest candidate to `input`, when one is close enough to be a likely typo (a few
/// edits, or one is a prefix of the other: `warning` suggests `warn`). Case is ignored, so
/// `Always` suggests `always`.
pub(super) fn suggest<'a>(input: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let input = input.to_ascii_lowercase();
    let close = candidates
        .iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&input, &c.to_ascii_lowercase()),
                *c,
            )
        })
        .filter(|(distance, c)| *distance <= (c.len().max(input.len()) / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c);
    close.or_else(|| {
        candidates.iter().copied().find(|c| {
            let c = c.to_ascii_lowercase();
            c.len().min(input.len()) >= 3 && (c.starts_with(&input) || input.starts_with(&c))
        })
    })
}

/// "unknown value `x`, did you mean `y`?" or "unknown value `x`; expected one of a, b".
pub(super) fn unknown_choice(what: &str, input: &str, candidates: &[&str]) -> String {
    match suggest(input, candidates) {
        Some(s) => format!("unknown {what} `{input}`, did you mean `{s}`?"),
        None => format!(
            "unknown {what} `{input}`; expected one of {}",
            candidates
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A duration: a string such as "250ms", "10s" or "1h 30m" (humantime syntax), at most
/// [`MAX_DURATION`]. A number is refused with the string to write instead: the unit must be
/// explicit.
pub(super) fn duration(value: &Scalar) -> Result<Duration, Invalid> {
    match value {
        Scalar::Str(s) => {
            let d = humantime::parse_duration(s.trim()).map_err(|e| {
                Invalid(format!(
                    "invalid duration \"{s}\" ({e}); write it like \"250ms\", \"10s\" or \"1h 30m\""
                ))
            })?;
            if d > MAX_DURATION {
                return Err(Invalid(format!(
                    "duration \"{s}\" is longer than the limit of {}",
                    humantime::format_duration(MAX_DURATION)
                )));
            }
            Ok(d)
        }
        Scalar::Int(n) => Err(Invalid(format!(
            "expected a duration string like \"5s\", found the number {n}; write \"{n}s\""
        ))),
        Scalar::Float(f) => Err(Invalid(format!(
            "expected a duration string like \"5s\", found the number {f}; write \"{}ms\"",
            (f * 1000.0).round()
        ))),
        Scalar::Bool(b) => Err(Invalid(format!(
            "expected a duration string like \"5s\", found the boolean {b}"
        ))),
    }
}

/// Size units: `B`; decimal `KB`, `MB`, `GB`, `TB` (powers of 1000); binary `KiB`, `MiB`,
/// `GiB`, `TiB` (powers of 1024). Case is ignored.
const SIZE_UNITS: &[(&str, u64)] = &[
    ("b", 1),
    ("kb", 1000),
    ("mb", 1000 * 1000),
    ("gb", 1000 * 1000 * 1000),
    ("tb", 1000 * 1000 * 1000 * 1000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
];

/// A size in bytes: a string of a whole number and a unit of [`SIZE_UNITS`], with optional
/// space between ("10MiB", "512 KB", "100B"; a bare "4096" is bytes). Like durations, a TOML
/// number is refused so that the unit is always explicit.
pub(super) fn size(value: &Scalar) -> Result<u64, Invalid> {
    const HINT: &str = "write it like \"10MiB\" (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)";
    let s = match value {
        Scalar::Str(s) => s.trim(),
        Scalar::Int(n) => {
            return Err(Invalid(format!(
                "expected a size string like \"10MiB\", found the number {n}; write \"{n}B\""
            )))
        }
        Scalar::Float(f) => {
            return Err(Invalid(format!(
                "expected a size string like \"10MiB\", found the number {f}; {HINT}"
            )))
        }
        Scalar::Bool(b) => {
            return Err(Invalid(format!(
                "expected a size string like \"10MiB\", found the boolean {b}"
            )))
        }
    };
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let unit = unit.trim();
    let invalid = || Invalid(format!("invalid size \"{s}\"; {HINT}"));
    if number.is_empty() {
        return Err(invalid());
    }
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let factor = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(u, _)| u.eq_ignore_ascii_case(unit))
            .map(|&(_, f)| f)
            .ok_or_else(invalid)?
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| Invalid(format!("size \"{s}\" is too large")))
}

/// A signal by name: "TERM", "SIGTERM", "term" and "sigterm" all name SIGTERM (case is
/// ignored, the `SIG` prefix is optional). Numbers are not accepted: they differ across
/// architectures.
pub(super) fn signal(name: &str) -> Result<Signal, Invalid> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if !bare.is_empty() {
        if let Ok(signal) = Signal::from_str(&format!("SIG{bare}")) {
            return Ok(signal);
        }
    }
    let names: Vec<&str> = Signal::iterator()
        .map(|s| s.as_str().trim_start_matches("SIG"))
        .collect();
    Err(Invalid(match suggest(bare, &names) {
        Some(s) => format!("unknown signal `{name}`, did you mean `{s}`?"),
        None => format!("unknown signal `{name}`; use a name like \"TERM\", \"HUP\" or \"INT\""),
    }))
}

/// An octal permission string, "022" or "0022" (1 to 4 octal digits), at most `max`. A TOML
/// number is refused: `umask = 022` is not valid TOML and `umask = 22` would be decimal.
pub(super) fn octal(value: &Scalar, max: u32, example: &str) -> Result<u32, Invalid> {
    let s = match value {
        Scalar::Str(s) => s.trim(),
        _ => {
            return Err(Invalid(format!(
                "expected an octal string like \"{example}\", found a {}; put it in quotes",
                scalar_kind(value)
            )))
        }
    };
    let ok = (1..=4).contains(&s.len()) && s.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(s, 8) {
        Ok(n) if ok && n <= max => Ok(n),
        _ => Err(Invalid(format!(
            "invalid value \"{s}\": expected octal digits at most \"{max:04o}\", like \"{example}\""
        ))),
    }
}

fn scalar_kind(value: &Scalar) -> &'static str {
    match value {
        Scalar::Str(_) => "string",
        Scalar::Int(_) | Scalar::Float(_) => "number",
        Scalar::Bool(_) => "boolean",
    }
}

/// Program and queue names: `[A-Za-z0-9_-]{1,64}` (no dots, so `PROGRAM.ID` parses).
pub(super) fn check_name(what: &str, name: &str) -> Result<(), Invalid> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Invalid(format!(
            "invalid {what} name `{name}`: use 1 to 64 characters among A-Z a-z 0-9 _ -"
        )))
    }
}

/// The one placeholder of lock names.
pub(super) const WORKER_PLACEHOLDER: &str = "{worker}";

/// Lock names, after `{worker}` expansion: `[A-Za-z0-9._-]{1,100}`, not starting with a dot.
pub(super) fn check_lock_name(name: &str) -> Result<(), Invalid> {
    let ok = (1..=100).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Invalid(format!(
            "invalid lock name `{name}`: use 1 to 100 characters among A-Z a-z 0-9 . _ -, \
             not starting with a dot"
        )))
    }
}

/// Checks a lock name template against every worker id it will be expanded with (the
/// shortest, 0, and the longest, `max_id`).
pub(super) fn check_lock_template(template: &str, max_id: u32) -> Result<(), Invalid> {
    let rest = template.replace(WORKER_PLACEHOLDER, "");
    if rest.contains('{') || rest.contains('}') {
        return Err(Invalid(format!(
            "invalid lock name `{template}`: `{WORKER_PLACEHOLDER}` is the only placeholder"
        )));
    }
    for id in [0, max_id] {
        let expanded = template.replace(WORKER_PLACEHOLDER, &id.to_string());
        check_lock_name(&expanded).map_err(|e| {
            if expanded == template {
                e
            } else {
                Invalid(format!("{e} (`{template}` for worker {id})"))
            }
        })?;
    }
    Ok(())
}

/// A name systemd accepts in `LISTEN_FDNAMES`: 1 to 255 printable ASCII characters, no `:`.
pub(super) fn check_fd_name(name: &str) -> Result<(), Invalid> {
    let ok =
        (1..=255).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if ok {
        Ok(())
    } else {
        Err(Invalid(format!(
            "invalid socket name `{name}`: use 1 to 255 printable ASCII characters, no `:` or space"
        )))
    }
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with the NUL).
const MAX_UNIX_PATH: usize = 107;

/// A listen or metrics address: `tcp:HOST:PORT` (HOST an IPv4 address or a bracketed IPv6
/// one), `unix:PATH` (relative to `dir`) or `systemd:NAME` (a socket systemd passed the master).
pub(super) fn listen_addr(s: &str, dir: &Path) -> Result<ListenAddr, Invalid> {
    if let Some(rest) = s.strip_prefix("tcp:") {
        let addr: SocketAddr = rest.parse().map_err(|_| {
            Invalid(format!(
                "invalid address `{s}`: expected tcp:HOST:PORT with an IP address, \
                 like \"tcp:127.0.0.1:8080\" or \"tcp:[::1]:8080\""
            ))
        })?;
        if addr.port() == 0 {
            return Err(Invalid(format!(
                "invalid address `{s}`: the port must be 1 to 65535"
            )));
        }
        Ok(ListenAddr::Tcp(addr))
    } else if let Some(rest) = s.strip_prefix("unix:") {
        if rest.is_empty() {
            return Err(Invalid(format!("invalid address `{s}`: the path is empty")));
        }
        let path = resolve(dir, rest);
        if path.as_os_str().len() > MAX_UNIX_PATH {
            return Err(Invalid(format!(
                "invalid address `{s}`: the socket path {} is longer than {MAX_UNIX_PATH} bytes",
                path.display()
            )));
        }
        Ok(ListenAddr::Unix(path))
    } else if let Some(rest) = s.strip_prefix("systemd:") {
        check_fd_name(rest).map_err(|e| Invalid(format!("invalid address `{s}`: {e}")))?;
        Ok(ListenAddr::Systemd(rest.to_owned()))
    } else {
        Err(Invalid(format!(
            "invalid address `{s}`: expected tcp:HOST:PORT, unix:PATH or systemd:NAME"
        )))
    }
}

/// `path` made absolute against `dir` (the config folder), without `.` components. `..` is
/// kept: resolving it would need the file system (symbolic links).
pub(super) fn resolve(dir: &Path, path: impl AsRef<Path>) -> PathBuf {
    let joined = dir.join(path);
    joined
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// `text` with the credentials of every URL in it masked: the password of `user:password@`
/// (`redis://:secret@host/0` → `redis://:***@host/0`), a lone `token@` whole, and the value
/// of a `password=` query parameter. Config errors pass through it, so a refused Redis or etcd
/// URL never shows its secret in `check`, a reload's answer or the log (SPEC §7).
pub fn mask_credentials(text: &str) -> String {
    /// Where a URL ends inside a message: at a space or a quote around it.
    fn url_end(rest: &str) -> usize {
        rest.find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | ',' | ']' | '>'))
            .unwrap_or(rest.len())
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + "://".len());
        out.push_str(head);
        let url = &tail[..url_end(tail)];
        // The user information ends at the last `@`: a password written with a `/`, `?`,
        // `#` or `@` in it unescaped is masked whole all the same.
        let host_start = match url.rfind('@') {
            Some(user_end) => {
                let userinfo = &url[..user_end];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..=colon]);
                        out.push_str("***");
                    }
                    None => out.push_str("***"),
                }
                user_end
            }
            None => 0,
        };
        let host_end = url[host_start..]
            .find(['/', '?', '#'])
            .map_or(url.len(), |i| host_start + i);
        out.push_str(&url[host_start..host_end]);
        out.push_str(&mask_password_parameter(&url[host_end..]));
        rest = &tail[url.len()..];
    }
    out.push_str(rest);
    out
}

/// A URL's path and query with the value of `password=` masked.
fn mask_password_parameter(path: &str) -> String {
    let Some(q) = path.find('?') else {
        return path.to_string();
    };
    let (before, query) = path.split_at(q + 1);
    let masked: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{before}{}", masked.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Scalar {
        Scalar::Str(v.to_owned())
    }

    #[test]
    fn durations() {
        assert_eq!(duration(&s("250ms")), Ok(Duration::from_millis(250)));
        assert_eq!(duration(&s("1h 30m")), Ok(Duration::from_secs(5400)));
        assert!(duration(&s("5 parsecs")).is_err());
        assert_eq!(duration(&s("10years")), Ok(MAX_DURATION));
        assert_eq!(
            duration(&s("99999999999999h")).unwrap_err().to_string(),
            "duration \"99999999999999h\" is longer than the limit of 10years"
        );
        assert_eq!(
            duration(&Scalar::Int(5)).unwrap_err().to_string(),
            "expected a duration string like \"5s\", found the number 5; write \"5s\""
        );
        assert!(duration(&Scalar::Float(1.5))
            .unwrap_err()
            .to_string()
            .ends_with("write \"1500ms\""));
    }

    #[test]
    fn sizes() {
        assert_eq!(size(&s("10MiB")), Ok(10 << 20));
        assert_eq!(size(&s("10 mib")), Ok(10 << 20));
        assert_eq!(size(&s("2KB")), Ok(2000));
        assert_eq!(size(&s("4096")), Ok(4096));
        assert_eq!(size(&s("1B")), Ok(1));
        for bad in [
            "",
            "MiB",
            "10 MiBs",
            "1.5GiB",
            "-1B",
            "99999999999999999999B",
            "10 M",
        ] {
            assert!(size(&s(bad)).is_err(), "{bad}");
        }
        assert!(size(&s("20000000TiB"))
            .unwrap_err()
            .to_string()
            .contains("too large"));
        assert!(size(&Scalar::Int(10))
            .unwrap_err()
            .to_string()
            .contains("write \"10B\""));
    }

    #[test]
    fn signals() {
        for name in ["TERM", "SIGTERM", "term", "sigterm", " SigTerm "] {
            assert_eq!(signal(name), Ok(Signal::SIGTERM), "{name}");
        }
        assert_eq!(signal("HUP"), Ok(Signal::SIGHUP));
        assert_eq!(
            signal("TREM").unwrap_err().to_string(),
            "unknown signal `TREM`, did you mean `TERM`?"
        );
        assert!(signal("SIG").is_err());
        assert!(signal("15").is_err());
    }

    #[test]
    fn octal_modes() {
        assert_eq!(octal(&s("022"), 0o777, "022"), Ok(0o22));
        assert_eq!(octal(&s("0022"), 0o777, "022"), Ok(0o22));
        assert_eq!(octal(&s("7"), 0o777, "022"), Ok(0o7));
        for bad in ["", "08", "1777", "00000", "abc", "0o22"] {
            assert!(octal(&s(bad), 0o777, "022").is_err(), "{bad}");
        }
        assert!(octal(&Scalar::Int(18), 0o777, "022")
            .unwrap_err()
            .to_string()
            .contains("put it in quotes"));
    }

    #[test]
    fn names() {
        assert!(check_name("program", "web_1-a").is_ok());
        assert!(check_name("program", &"a".repeat(64)).is_ok());
        for bad in ["", "a.b", "a b", "é", &"a".repeat(65)] {
            assert!(check_name("program", bad).is_err(), "{bad}");
        }
        assert!(check_lock_template("db.{worker}", 9999).is_ok());
        assert!(check_lock_template(".db", 0).is_err());
        assert!(check_lock_template("db/{worker}", 0).is_err());
        assert!(check_lock_template("db-{id}", 0)
            .unwrap_err()
            .to_string()
            .contains("only placeholder"));
        let long = format!("{}{{worker}}", "a".repeat(98));
        assert!(check_lock_template(&long, 9).is_ok());
        assert!(check_lock_template(&long, 100)
            .unwrap_err()
            .to_string()
            .contains("for worker 100"));
    }

    #[test]
    fn listen_addresses() {
        let dir = Path::new("/etc/plumule");
        assert_eq!(
            listen_addr("tcp:0.0.0.0:8080", dir),
            Ok(ListenAddr::Tcp("0.0.0.0:8080".parse().unwrap()))
        );
        assert_eq!(
            listen_addr("tcp:[::1]:80", dir),
            Ok(ListenAddr::Tcp("[::1]:80".parse().unwrap()))
        );
        assert_eq!(
            listen_addr("unix:./run/web.sock", dir),
            Ok(ListenAddr::Unix("/etc/plumule/run/web.sock".into()))
        );
        assert_eq!(
            listen_addr("systemd:web", dir),
            Ok(ListenAddr::Systemd("web".into()))
        );
        for bad in [
            "tcp:localhost:80",
            "tcp:1.2.3.4",
            "tcp:1.2.3.4:0",
            "udp:1.2.3.4:5",
            "unix:",
            "systemd:a:b",
        ] {
            assert!(listen_addr(bad, dir).is_err(), "{bad}");
        }
        let long = format!("unix:/{}", "s".repeat(120));
        assert!(listen_addr(&long, dir)
            .unwrap_err()
            .to_string()
            .contains("longer than"));
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("worker", &["workers", "restart"]), Some("workers"));
        assert_eq!(
            suggest("onfailure", &["always", "on-failure"]),
            Some("on-failure")
        );
        assert_eq!(suggest("Always", &["always"]), Some("always"));
        assert_eq!(suggest("zzz", &["always", "never"]), None);
        assert_eq!(suggest("warning", &["error", "warn", "info"]), Some("warn"));
        assert_eq!(suggest("on", &["on-failure"]), None);
    }
}
