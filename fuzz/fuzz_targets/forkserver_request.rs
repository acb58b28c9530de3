//! The fork server's requests (`sys::forkserver::decode`), as the server reads them from its
//! socket: never a panic, and no allocation the payload cannot back; a payload that decodes
//! is exactly what `encode` makes of the result (the format has one spelling per request),
//! and its `pid_vars` name entries of the environment, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plumule::sys::forkserver::{decode, encode};
use plumule::sys::spawn::Body;

fuzz_target!(|data: &[u8]| {
    // Byte 0: how many descriptors past the four the server requires (status, stdio).
    let Some((&extra, payload)) = data.split_first() else {
        return;
    };
    let fds: Vec<i32> = (0..4 + i32::from(extra % 8)).map(|i| 100 + i).collect();
    assert!(decode(payload, &fds[..3]).is_none(), "decoded with 3 descriptors");
    let Some((setup, body)) = decode(payload, &fds) else {
        return;
    };
    assert_eq!((setup.stdin, setup.stdout, setup.stderr), (101, 102, 103));
    assert_eq!(setup.pass_fds, fds[4..]);
    let again = encode(&setup, &body).expect("an exec body encodes");
    assert_eq!(again, payload, "decoded as {setup:?}, {body:?}");
    let Body::Exec { envp, pid_vars, .. } = &body else {
        panic!("decoded a function body");
    };
    assert!(
        pid_vars.windows(2).all(|w| w[0] < w[1]) && pid_vars.iter().all(|&i| i < envp.len()),
        "pid_vars {pid_vars:?} for {} environment entries",
        envp.len()
    );
});
