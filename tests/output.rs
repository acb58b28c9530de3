//! Worker output: forwarded to the master's log tagged `PROGRAM.ID`, or written to a file that
//! rotates by size and is reopened on SIGUSR1 (SPEC §2 `stdout`/`stderr`, §3, §6 "Logs", §9).

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use common::*;

#[test]
fn log_output_reaches_the_master_stderr_tagged_program_dot_id() {
    let sb = Sandbox::new();
    let script = sb.worker(
        "talker.sh",
        "echo \"hello from $PLUMULE_WORKER_ID\"\necho \"oops from $PLUMULE_WORKER_ID\" >&2\n\
         exec sleep 1000",
    );
    let config = sb.config(&format!(
        "[program.talker]\ncommand = {}\nworkers = 2\nstdout = \"log\"\nstderr = \"log\"\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    for id in 0..2 {
        master.wait_stderr(&[&format!("talker.{id}: hello from {id}")], DEADLINE);
        master.wait_stderr(&[&format!("talker.{id}: oops from {id}")], DEADLINE);
    }
    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}

#[test]
fn a_very_long_line_and_an_unterminated_last_line_are_forwarded() {
    let sb = Sandbox::new();
    let script = sb.worker(
        "tail.sh",
        "head -c 200000 /dev/zero | tr '\\0' x\necho\necho 'after the long line'\n\
         printf 'no newline at the end'\nexit 0",
    );
    let config = sb.config(&format!(
        "[program.tail]\ncommand = {}\nrestart = \"never\"\n",
        argv(&script)
    ));
    let mut master = sb.start(&config);

    master.wait_stderr(&["tail.0: xxxxxxxx"], DEADLINE);
    master.wait_stderr(&["tail.0: after the long line"], DEADLINE);
    master.wait_stderr(&["tail.0: no newline at the end"], DEADLINE);
    assert!(master.running(), "the master survived the long line");
    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}

/// Opens the FIFO a worker is waiting on and writes a line to it (retrying until the worker
/// has opened its end: a non-blocking open for writing fails with ENXIO before that).
fn release(sb: &Sandbox, fifo: &Path) {
    sb.wait(
        "the worker has opened its FIFO",
        DEADLINE,
        || match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
        {
            Ok(mut f) => {
                f.write_all(b"go\n").expect("write to the FIFO");
                true
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => false,
            Err(e) => panic!("cannot open {}: {e}", fifo.display()),
        },
    );
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned()
}

#[test]
fn file_output_rotates_by_size_keeps_n_files_and_reopens_on_sigusr1() {
    let sb = Sandbox::new();
    let fifo = sb.path("go");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    // 200 lines of 32 bytes, then (once released) 3 more, then it idles.
    let script = sb.worker(
        "writer.sh",
        &format!(
            "i=1\nwhile [ $i -le 200 ]; do printf 'phase1 line %04d ..............\\n' $i; \
             i=$((i+1)); done\nread go < {}\nprintf 'phase2 line %04d\\n' 1 2 3\nexec sleep 1000",
            sh_str(&fifo)
        ),
    );
    let file = sb.path("writer.out");
    let config = sb.config(&format!(
        "[program.writer]\ncommand = {}\nstdout = {{ file = {}, max_size = \"1KiB\", keep = 2 }}\n",
        argv(&script),
        toml_str(&file)
    ));
    let mut master = sb.start(&config);
    let rotated = |n: u32| sb.path(&format!("writer.out.{n}"));

    // Oldest to newest: FILE.2, FILE.1, FILE.
    let kept = || {
        [rotated(2), rotated(1), file.clone()]
            .iter()
            .map(|p| read(p))
            .collect::<String>()
    };
    sb.wait("the 200th line is in the output files", DEADLINE, || {
        kept().contains("phase1 line 0200")
    });
    for path in [&file, &rotated(1), &rotated(2)] {
        let size = fs::metadata(path).map(|m| m.len());
        assert!(
            size.as_ref().is_ok_and(|s| *s <= 2048),
            "{} should exist and stay near max_size 1KiB: {size:?}",
            path.display()
        );
    }
    assert!(
        !rotated(3).exists(),
        "keep = 2, yet {} exists",
        rotated(3).display()
    );
    let numbers: Vec<u32> = kept()
        .lines()
        .map(|l| {
            let n = l
                .strip_prefix("phase1 line ")
                .and_then(|r| r.get(..4)?.parse().ok());
            n.unwrap_or_else(|| panic!("mangled line {l:?} in the output files"))
        })
        .collect();
    assert_eq!(numbers.last(), Some(&200));
    assert!(
        numbers[0] > 1,
        "6400 bytes cannot fit in 3 files of 1KiB: the oldest lines go"
    );
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "FILE.2, FILE.1, FILE hold consecutive lines, oldest first: {numbers:?}"
    );

    // logrotate's way: move the file, then ask for a reopen.
    let moved = sb.path("writer.out.moved");
    fs::rename(&file, &moved).expect("rename");
    master.signal(SIGUSR1);
    release(&sb, &fifo);
    sb.wait("a new output file holds the later lines", DEADLINE, || {
        read(&file).contains("phase2 line 0003")
    });
    assert!(
        !read(&moved).contains("phase2"),
        "later lines went to the moved file"
    );
    assert!(master.running(), "SIGUSR1 does not stop the master");
    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}

#[test]
fn file_output_creates_a_missing_folder() {
    let sb = Sandbox::new();
    let script = sb.worker("w.sh", "echo ready\nexec sleep 1000");
    let file = sb.path("logs/deeper/w.out");
    let config = sb.config(&format!(
        "[program.w]\ncommand = {}\nstdout = {{ file = {} }}\n",
        argv(&script),
        toml_str(&file)
    ));
    let mut master = sb.start(&config);
    sb.wait(
        "the worker's line is in logs/deeper/w.out",
        DEADLINE,
        || read(&file) == "ready\n",
    );
    let status = master.stop_with(SIGTERM, DEADLINE);
    assert_exit_code(status, 0, &master.stderr_text());
}
