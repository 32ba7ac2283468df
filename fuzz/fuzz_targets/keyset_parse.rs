//! `KeySet::parse` on any input: never panics, accepts exactly the lists whose entries are
//! non-empty, visible ASCII without quotes or semicolons, and distinct, and its errors
//! never quote an entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_key_rotation::{ApiKey, KeySet};

/// The spec, written plainly (the same as tests/properties.rs).
fn expected(input: &str) -> Option<Vec<&str>> {
    if input.trim().is_empty() {
        return None;
    }
    let entries: Vec<&str> = input.split(',').map(str::trim).collect();
    for (i, entry) in entries.iter().enumerate() {
        // Visible ASCII, but no quote or semicolon (the marks of a list written wrong).
        let visible = !entry.is_empty()
            && entry
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && !b"\"'`;".contains(&b));
        if !visible || entries[..i].contains(entry) {
            return None;
        }
    }
    Some(entries)
}

/// An entry holding a character that no error or `Debug` wording uses, and long enough not
/// to be a lone byte an error names: if it shows up in such text, it was echoed.
fn marked(entry: &str) -> bool {
    entry.len() >= 6 && entry.bytes().any(|b| b"#@%^~|".contains(&b))
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = KeySet::parse(input);
    match (expected(input), parsed) {
        (Some(keys), Ok(set)) => {
            let got: Vec<&str> = set.keys().map(ApiKey::expose_secret).collect();
            assert_eq!(got, keys);
            // Debug of the set and of each key is redacted.
            let debug = format!("{set:?} {:?}", set.keys().collect::<Vec<_>>());
            // (Only keys no redacted wording can contain: see `marked` below.)
            for key in keys.iter().filter(|k| marked(k)) {
                assert!(!debug.contains(key), "Debug shows a key");
            }
        }
        (None, Err(error)) => {
            let text = format!("{error} {error:?}");
            for entry in input.split(',').map(str::trim) {
                if marked(entry) {
                    assert!(!text.contains(entry), "error quotes an entry: {text}");
                }
            }
        }
        (Some(_), Err(error)) => panic!("a valid list was refused: {error}"),
        (None, Ok(_)) => panic!("an invalid list was accepted"),
    }
});
