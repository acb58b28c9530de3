//! Lines from the master, as the client reads them (`protocol::parse_message`): never a
//! panic; a response the client parses is one the master can write back as one line that
//! parses the same. Also `parse_request_line`'s progress flag: a request that parses with it
//! parses the same without the flag.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plumule::protocol::{parse_message, parse_request_line, Message};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(message) = parse_message(&text) {
        let line = match &message {
            Message::Response(r) => r.to_line(),
            Message::Progress(p) => {
                let mut l = serde_json::to_vec(&serde_json::json!({ "progress": p })).unwrap();
                l.push(b'\n');
                l
            }
        };
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let back = std::str::from_utf8(&line[..line.len() - 1]).unwrap();
        assert_eq!(parse_message(back).ok(), Some(message), "written as {back:?}");
    }
    if let Ok((request, _progress)) = parse_request_line(data) {
        let mut value = serde_json::to_value(&request).unwrap();
        value
            .as_object_mut()
            .expect("a request is an object")
            .insert("progress".into(), true.into());
        let line = serde_json::to_vec(&value).unwrap();
        assert_eq!(parse_request_line(&line).ok(), Some((request, true)));
    }
});
