//! Key list parsing: what is accepted, and errors that name positions, never values.

use tower_key_rotation::{ApiKey, KeyError, KeySet};

#[test]
fn from_env_reads_and_trims_the_list() {
    let keys = KeySet::from_env("TKR_TEST_KEYS").unwrap();
    let values: Vec<&str> = keys.keys().map(ApiKey::expose_secret).collect();
    assert_eq!(values, ["alpha-111", "beta-222", "gamma-333"]);
}

#[test]
fn an_unset_or_blank_variable_says_no_key_is_configured() {
    let err = KeySet::from_env("TKR_TEST_SURELY_UNSET").unwrap_err();
    assert_eq!(
        err.to_string(),
        "no API key configured in TKR_TEST_SURELY_UNSET"
    );
    let err = KeySet::from_env("TKR_TEST_BLANK_KEYS").unwrap_err();
    assert_eq!(
        err.to_string(),
        "no API key configured in TKR_TEST_BLANK_KEYS"
    );
}

#[test]
fn errors_from_the_environment_name_the_variable_and_position() {
    let err = KeySet::from_env("TKR_TEST_BAD_KEYS").unwrap_err();
    assert_eq!(
        err.to_string(),
        "key 2 of 3 is empty (two commas in a row?) (in TKR_TEST_BAD_KEYS)"
    );
}

#[test]
fn each_bad_input_gets_its_own_error() {
    let cases: [(&str, &str); 6] = [
        ("", "no API key configured"),
        ("k1,,k2", "key 2 of 3 is empty (two commas in a row?)"),
        (",k1", "key 1 of 2 is empty (two commas in a row?)"),
        (
            "k1,k\n2",
            "key 2 of 2 contains a control character at byte 2; keys must be visible ASCII",
        ),
        (
            "sk-ok,sk-bad key",
            "key 2 of 2 contains white space at byte 7; keys must be visible ASCII",
        ),
        ("same-1,other,same-1", "key 3 of 3 repeats key 1"),
    ];
    for (input, message) in cases {
        assert_eq!(
            KeySet::parse(input).unwrap_err().to_string(),
            message,
            "{input:?}"
        );
    }
}

#[test]
fn errors_never_contain_a_key_value() {
    let secrets = ["sk-topsecret-1", "sk-topsecret-2"];
    let inputs = [
        format!("{},{}", secrets[0], secrets[0]),
        format!("{},,{}", secrets[0], secrets[1]),
        format!("{}\u{0},{}", secrets[0], secrets[1]),
        format!("{},{} é", secrets[0], secrets[1]),
    ];
    for input in &inputs {
        let err: KeyError = KeySet::parse(input).unwrap_err();
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(!secrets.iter().any(|s| text.contains(s)), "{text}");
            assert!(!text.contains("topsecret"), "{text}");
        }
    }
}

#[test]
fn from_keys_rejects_duplicates_and_emptiness() {
    let a = ApiKey::new("alpha").unwrap();
    let err = KeySet::from_keys([a.clone(), a]).unwrap_err();
    assert_eq!(err.to_string(), "key 2 of 2 repeats key 1");
    assert_eq!(
        KeySet::from_keys([]).unwrap_err().to_string(),
        "no API key configured"
    );
    assert!(ApiKey::new("  ").is_err());
}
