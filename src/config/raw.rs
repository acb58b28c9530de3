//! The TOML file exactly as the user wrote it: serde types whose keys are the snake_case keys
//! of SPEC §2, with `deny_unknown_fields` everywhere.
//!
//! Every field is optional, so a missing key is reported by validation (with every other
//! problem) rather than by serde (which stops at the first). Leaves are [`Spanned`] so that
//! validation can point at the value. Values whose checks need a good message rather than serde's
//! ("found the number 5; write \"5s\"") are read loosely as a [`Scalar`] and judged later.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub plumule: Option<Table<RawPlumule>>,
    pub program: Option<BTreeMap<Spanned<String>, Table<RawProgram>>>,
    pub queue: Option<BTreeMap<Spanned<String>, Table<RawQueue>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlumule {
    pub runtime_dir: Option<Spanned<String>>,
    pub state_dir: Option<Spanned<String>>,
    pub lock_dir: Option<Spanned<String>>,
    pub control_group: Option<Spanned<String>>,
    pub metrics: Option<Spanned<String>>,
    pub shutdown_timeout: Option<Spanned<Scalar>>,
    pub log_level: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProgram {
    pub command: Option<Spanned<RawCommand>>,
    pub workers: Option<Spanned<i64>>,
    pub restart: Option<Spanned<String>>,
    pub success_exit_codes: Option<Vec<Spanned<i64>>>,
    pub healthy_after: Option<Spanned<Scalar>>,
    pub backoff: Option<Table<RawBackoff>>,
    pub start_limit: Option<Table<RawStartLimit>>,
    pub stop_signal: Option<Spanned<String>>,
    pub stop_timeout: Option<Spanned<Scalar>>,
    pub reload: Option<Spanned<String>>,
    pub reload_signal: Option<Spanned<String>>,
    pub env: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    pub inherit_env: Option<bool>,
    pub cwd: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    pub umask: Option<Spanned<Scalar>>,
    pub stdout: Option<Spanned<RawOutput>>,
    pub stderr: Option<Spanned<RawOutput>>,
    pub locks: Option<Vec<Spanned<RawLock>>>,
    pub ready: Option<Spanned<String>>,
    pub ready_timeout: Option<Spanned<Scalar>>,
    pub watchdog: Option<Spanned<Scalar>>,
    pub listen: Option<Vec<Spanned<RawListen>>>,
    pub after: Option<Vec<Spanned<String>>>,
    pub queue: Option<Spanned<String>>,
}

/// `backoff` and `retry_backoff`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    pub initial: Option<Spanned<Scalar>>,
    pub max: Option<Spanned<Scalar>>,
    pub multiplier: Option<Spanned<f64>>,
    pub jitter: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStartLimit {
    pub burst: Option<Spanned<i64>>,
    pub interval: Option<Spanned<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub durable: Option<bool>,
    pub protocol: Option<Spanned<String>>,
    pub prefetch: Option<Spanned<i64>>,
    pub max_attempts: Option<Spanned<i64>>,
    pub retry_backoff: Option<Table<RawBackoff>>,
    pub route: Option<Spanned<String>>,
    pub max_pending: Option<Spanned<i64>>,
    pub max_frame: Option<Spanned<Scalar>>,
}

/// A TOML table read into `T`. A derived struct would also accept an array, filling its
/// fields in order (`plumule = ["/run/x"]` would set `runtime_dir`): this accepts tables only.
#[derive(Debug, Default)]
pub(super) struct Table<T>(pub T);

impl<T> std::ops::Deref for Table<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Table<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TableVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for TableVisitor<T> {
            type Value = Table<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Table<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Table)
            }
        }
        deserializer.deserialize_map(TableVisitor(std::marker::PhantomData))
    }
}

/// A scalar of any TOML type, for values that are strings but deserve a better message than
/// serde's when they are not (durations, sizes, octal modes).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                i64::try_from(v)
                    .map(Scalar::Int)
                    .map_err(|_| E::custom("number out of range"))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// `command`: an argv array, or a string for `/bin/sh -c`.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RawCommand {
    Argv(Vec<Spanned<String>>),
    Shell(String),
}

impl<'de> Deserialize<'de> for RawCommand {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CommandVisitor;
        impl<'de> Visitor<'de> for CommandVisitor {
            type Value = RawCommand;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of strings (argv) or a string (run by /bin/sh -c)")
            }
            fn visit_str<E>(self, v: &str) -> Result<RawCommand, E> {
                Ok(RawCommand::Shell(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawCommand, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element()? {
                    argv.push(arg);
                }
                Ok(RawCommand::Argv(argv))
            }
        }
        deserializer.deserialize_any(CommandVisitor)
    }
}

/// `stdout` / `stderr`: a mode string or a `{ file = … }` table.
#[derive(Debug)]
pub(super) enum RawOutput {
    Mode(String),
    File(RawOutputFile),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutputFile {
    pub file: Option<Spanned<String>>,
    pub max_size: Option<Spanned<Scalar>>,
    pub keep: Option<Spanned<i64>>,
}

/// `locks` entries: a name, or `{ name = …, shared = true }`.
#[derive(Debug)]
pub(super) enum RawLock {
    Name(String),
    Table(RawLockTable),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLockTable {
    pub name: Option<Spanned<String>>,
    pub shared: Option<bool>,
}

/// `listen` entries: an address, or `{ address = …, name = …, mode = "0660" }`.
#[derive(Debug)]
pub(super) enum RawListen {
    Address(String),
    Table(RawListenTable),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListenTable {
    pub address: Option<Spanned<String>>,
    pub name: Option<Spanned<String>>,
    pub mode: Option<Spanned<Scalar>>,
}

/// Implements `Deserialize` for an enum that is either a string or a table, without
/// `#[serde(untagged)]`: untagged enums buffer the input and lose the spans and the unknown-key
/// errors of the table form.
macro_rules! string_or_table {
    ($ty:ident, $string:ident, $table:ident, $table_ty:ty, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E>(self, v: &str) -> Result<$ty, E> {
                        Ok($ty::$string(v.to_owned()))
                    }
                    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<$ty, A::Error> {
                        let table =
                            <$table_ty>::deserialize(de::value::MapAccessDeserializer::new(map))?;
                        Ok($ty::$table(table))
                    }
                }
                deserializer.deserialize_any(V)
            }
        }
    };
}

string_or_table!(
    RawOutput,
    Mode,
    File,
    RawOutputFile,
    "\"log\", \"inherit\", \"null\" or a table { file = \"...\" }"
);
string_or_table!(
    RawLock,
    Name,
    Table,
    RawLockTable,
    "a lock name or a table { name = \"...\", shared = true }"
);
string_or_table!(
    RawListen,
    Address,
    Table,
    RawListenTable,
    "an address like \"tcp:0.0.0.0:8080\" or a table { address = \"...\" }"
);
