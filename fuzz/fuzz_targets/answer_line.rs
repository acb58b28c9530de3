//! One `lines` answer (`queue::wire::parse_answer_line`): never a panic; an answer is one of
//! the three words then the rest of the line as text; an error names the line on one line;
//! what parses encodes (when the encoder takes it) to a line that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plumule::config::QueueProtocol;
use plumule::queue::wire::{encode_answer, parse_answer_line, AnswerDecoder};

fuzz_target!(|line: &[u8]| {
    match parse_answer_line(line) {
        Ok(answer) => {
            let word = answer.outcome.keyword().as_bytes();
            assert!(line.starts_with(word));
            match line.get(word.len()) {
                None => assert!(answer.text.is_empty()),
                Some(b' ') => assert_eq!(answer.text, line[word.len() + 1..]),
                Some(other) => panic!("{word:?} followed by {other}"),
            }
            let mut bytes = Vec::new();
            if encode_answer(QueueProtocol::Lines, answer.outcome, &answer.text, u64::MAX, &mut bytes)
                .is_ok()
            {
                assert_eq!(parse_answer_line(&bytes[..bytes.len() - 1]), Ok(answer.clone()));
                let mut d = AnswerDecoder::new(QueueProtocol::Lines, 1 << 20);
                let mut got = Vec::new();
                d.push(&bytes, |a| got.push(a)).unwrap();
                d.finish().unwrap();
                assert_eq!(got, vec![answer]);
            }
        }
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
        }
    }
});
