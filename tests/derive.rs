//! `#[derive(Encrypted)]`: the derived schema equals the hand-built one, follows serde's
//! serialized names (checked against what serde really writes), round-trips through the schema
//! file format, and fails cleanly where types cannot be described; and the derive's
//! compile-time rule checks agree with `Schema::builder`, case by case.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use bson::oid::ObjectId;
use bson::{Bson, Document};
use fieldcrypt::{BlindIndex, Encrypted, Error, Field, Schema, Suite};
use serde::{Deserialize, Serialize};

/// The derive's rule checks, compiled here as well so their verdicts can be compared with the
/// library's.
#[allow(dead_code)] // only the checks are used here
#[path = "../derive/src/rules.rs"]
mod rules;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Encrypted)]
struct Profile {
    #[fieldcrypt(key = "pii", deterministic)]
    phone: String,
    city: String,
    #[fieldcrypt(key = "pii", pad_to = 16, algorithm = "XChaCha20-Poly1305")]
    notes: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Encrypted)]
#[fieldcrypt(owner = "tenant_id")]
struct User {
    #[serde(rename = "_id")]
    id: ObjectId,
    tenant_id: String,
    #[fieldcrypt(key = "pii", bind_id)]
    ssn: String,
    #[fieldcrypt(key = "lookup", deterministic)]
    email: String,
    #[fieldcrypt(blind_index(key = "tokens"), index_only)]
    api_token: Option<String>,
    #[fieldcrypt(key = "pii", each)]
    tags: Vec<String>,
    profile: Profile,
}

fn user() -> User {
    User {
        id: ObjectId::new(),
        tenant_id: "acme".into(),
        ssn: "123-45-6789".into(),
        email: "ada@example.com".into(),
        api_token: Some("tok".into()),
        tags: vec!["a".into()],
        profile: Profile {
            phone: "+1".into(),
            city: "x".into(),
            notes: Some("n".into()),
        },
    }
}

fn sorted(s: &Schema) -> Vec<fieldcrypt::FieldRule> {
    let mut r = s.rules().to_vec();
    r.sort_by(|a, b| a.path.cmp(&b.path));
    r
}

#[test]
fn the_issue_example_equals_the_hand_built_schema() {
    let by_hand = Schema::builder()
        .owner_field("tenant_id")
        .field("ssn", Field::randomized("pii").bind_id())
        .field("email", Field::deterministic("lookup"))
        .field(
            "api_token",
            Field::blind_index_only(BlindIndex::new("tokens")),
        )
        .field("tags.$[]", Field::randomized("pii"))
        .field("profile.phone", Field::deterministic("pii"))
        .field(
            "profile.notes",
            Field::randomized("pii")
                .suite(Suite::XChaCha20Poly1305)
                .pad_to(16),
        )
        .build()
        .unwrap();
    let derived = User::schema();
    assert_eq!(sorted(&derived), sorted(&by_hand));
    assert_eq!(derived.owner_field(), Some("tenant_id"));
    assert_eq!(sorted(&Schema::of::<User>().unwrap()), sorted(&by_hand));
}

/// Every rule's path (and blind index's parent) names something serde really writes.
fn assert_paths_are_serialized<T: Serialize + Encrypted>(value: &T) {
    let doc = bson::to_document(value).unwrap();
    for r in T::schema().rules() {
        let mut at: Option<&Bson> = None;
        let mut cur: &Document = &doc;
        for seg in r.normalized.split('.') {
            let v = cur
                .get(seg)
                .unwrap_or_else(|| panic!("{:?} is not in {doc:?}", r.path));
            at = Some(v);
            match v {
                Bson::Document(d) => cur = d,
                Bson::Array(a) => {
                    if let Some(Bson::Document(d)) = a.first() {
                        cur = d;
                    }
                }
                _ => {}
            }
        }
        if r.each_element {
            assert!(matches!(at, Some(Bson::Array(_))), "{}", r.path);
        }
    }
}

#[derive(Serialize, Deserialize, Encrypted)]
#[serde(rename_all = "camelCase")]
struct Renamed {
    #[fieldcrypt(key = "pii")]
    home_phone: String,
    #[serde(rename = "mail")]
    #[fieldcrypt(key = "pii", deterministic)]
    e_mail: String,
    #[serde(skip)]
    #[allow(dead_code)]
    cache: u32,
    #[serde(flatten)]
    extra: Extra,
    #[serde(flatten)]
    rest: HashMap<String, String>,
    r#type: Option<Vec<Profile>>,
    boxed: Box<Profile>,
}

#[derive(Serialize, Deserialize, Encrypted)]
#[serde(rename_all = "SCREAMING-KEBAB-CASE")]
struct Extra {
    #[fieldcrypt(key = "pii")]
    card_number: String,
}

#[test]
fn serde_names_are_the_paths() {
    let s = Renamed::schema();
    let mut paths: Vec<&str> = s.rules().iter().map(|r| r.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "CARD-NUMBER",
            "boxed.notes",
            "boxed.phone",
            "homePhone",
            "mail",
            "type.notes",
            "type.phone"
        ]
    );
    let p = Profile {
        phone: "1".into(),
        city: "c".into(),
        notes: Some("n".into()),
    };
    assert_paths_are_serialized(&Renamed {
        home_phone: "1".into(),
        e_mail: "e".into(),
        cache: 0,
        extra: Extra {
            card_number: "4111".into(),
        },
        rest: HashMap::new(),
        r#type: Some(vec![p.clone()]),
        boxed: Box::new(p),
    });
    assert_paths_are_serialized(&user());
}

#[derive(Serialize, Deserialize, Encrypted)]
enum External {
    Card {
        #[fieldcrypt(key = "pii")]
        number: String,
    },
    #[serde(rename = "iban")]
    Iban(#[fieldcrypt(key = "pii", deterministic)] String),
    Nested(Profile),
    Cash,
}

#[derive(Serialize, Deserialize, Encrypted)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Internal {
    Card {
        #[fieldcrypt(key = "pii")]
        number: String,
    },
    Debit {
        #[fieldcrypt(key = "pii")]
        number: String,
        bank: String,
    },
    Nested(Profile),
}

#[derive(Serialize, Deserialize, Encrypted)]
#[serde(tag = "t", content = "c", rename_all_fields = "camelCase")]
enum Adjacent {
    Card {
        #[fieldcrypt(key = "pii")]
        card_number: String,
    },
}

#[derive(Serialize, Deserialize, Encrypted)]
#[serde(untagged)]
enum Untagged {
    Card {
        #[fieldcrypt(key = "pii")]
        number: String,
    },
}

#[derive(Serialize, Deserialize, Encrypted)]
struct Payment {
    external: External,
    internal: Internal,
    adjacent: Adjacent,
    untagged: Untagged,
}

#[test]
fn enums_follow_serde_tagging() {
    let s = Payment::schema();
    let mut paths: Vec<&str> = s.rules().iter().map(|r| r.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "adjacent.c.cardNumber",
            "external.Card.number",
            "external.Nested.notes",
            "external.Nested.phone",
            "external.iban",
            "internal.notes",
            "internal.number",
            "internal.phone",
            "untagged.number",
        ]
    );
    assert!(s.rule("external.iban").unwrap().field.is_deterministic());
    // Each variant's paths are where serde writes them.
    let p = || Profile {
        phone: "1".into(),
        city: "c".into(),
        notes: Some("n".into()),
    };
    // With how many of the schema's paths each sample is written: its external and internal
    // variants' (a nested Profile writes two), the adjacent and the untagged one.
    for (e, i, written) in [
        (
            External::Card { number: "1".into() },
            Internal::Card { number: "1".into() },
            4,
        ),
        (
            External::Nested(p()),
            Internal::Debit {
                number: "1".into(),
                bank: "b".into(),
            },
            5,
        ),
        (External::Iban("DE".into()), Internal::Nested(p()), 5),
    ] {
        let doc = bson::to_document(&Payment {
            external: e,
            internal: i,
            adjacent: Adjacent::Card {
                card_number: "1".into(),
            },
            untagged: Untagged::Card { number: "1".into() },
        })
        .unwrap();
        let present = s.rules().iter().filter(|r| {
            let mut cur = Some(&doc);
            let segs: Vec<&str> = r.normalized.split('.').collect();
            for (k, seg) in segs.iter().enumerate() {
                match cur.and_then(|d| d.get(*seg)) {
                    Some(Bson::Document(d)) => cur = Some(d),
                    Some(_) if k == segs.len() - 1 => return true,
                    _ => return false,
                }
            }
            true
        });
        assert_eq!(present.count(), written, "{doc:?}");
    }
}

#[derive(Serialize, Encrypted)]
struct Tree {
    #[fieldcrypt(key = "pii")]
    label: String,
    children: Vec<Tree>,
}

#[derive(Serialize, Encrypted)]
struct PlainTree {
    label: String,
    children: Vec<PlainTree>,
}

#[derive(Serialize, Encrypted)]
struct ByName {
    people: HashMap<String, Profile>,
    counts: HashMap<String, u32>,
}

#[derive(Serialize, Encrypted)]
struct Clash {
    #[fieldcrypt(blind_index(key = "tokens", name = "phone"), index_only)]
    token: String,
    // The blind index lands on a flattened type's field: found when the schema is built.
    #[serde(flatten)]
    profile: Profile,
}

#[derive(Serialize, Encrypted)]
struct HasPhone {
    phone: Phone,
}

#[derive(Serialize, Encrypted)]
#[serde(transparent)]
struct Phone(Profile);

fn schema_error<T: Encrypted>() -> (String, String) {
    match T::try_schema() {
        Err(Error::Schema { path, reason }) => (path, reason),
        other => panic!(
            "expected a schema error, got {:?}",
            other.map(|s| s.rules().to_vec())
        ),
    }
}

#[test]
fn fail_what_a_schema_cannot_name_is_an_error_when_built() {
    let (path, reason) = schema_error::<Tree>();
    assert_eq!(path, "children");
    assert!(reason.contains("recursive"), "{reason}");
    // A recursive type without marks has nothing to name.
    assert!(PlainTree::try_schema().unwrap().rules().is_empty());
    let (path, reason) = schema_error::<ByName>();
    assert_eq!(path, "people.phone");
    assert!(reason.contains("map"), "{reason}");
    let (path, reason) = schema_error::<Clash>();
    assert_eq!(path, "token", "{reason}");
    // A transparent newtype is its inner value.
    let mut paths: Vec<String> = HasPhone::schema()
        .rules()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    paths.sort_unstable();
    assert_eq!(paths, ["phone.notes", "phone.phone"]);
    let panicked = std::panic::catch_unwind(Tree::schema).unwrap_err();
    let msg = panicked.downcast_ref::<String>().unwrap();
    assert!(msg.contains("Tree") && msg.contains("recursive"), "{msg}");
}

/// However the field's type is spelled, a nested type is found by its `Encrypted`
/// implementation; where its fields' stored paths are unknown, building the schema fails
/// rather than leaving them in clear.
type Profiles = Vec<Profile>;

/// A generic wrapper fieldcrypt knows nothing about.
#[derive(Serialize)]
struct Wrapper<T>(T);

fn as_text<S: serde::Serializer>(p: &Profile, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.city)
}

#[derive(Serialize, Encrypted)]
struct Spelled {
    aliased: Profiles,
    boxed: Box<Profile>,
    locked: std::sync::Mutex<Option<Profile>>,
    borrowed: std::borrow::Cow<'static, [Profile]>,
    many: [Profile; 2],
}

#[derive(Serialize, Encrypted)]
struct InTuple {
    pair: (Profile, u8),
}

#[derive(Serialize, Encrypted)]
struct InWrapper {
    wrapped: Option<Wrapper<Profile>>,
}

#[derive(Serialize, Encrypted)]
struct CustomSerialized {
    #[serde(serialize_with = "as_text")]
    profile: Profile,
}

#[derive(Serialize, Encrypted)]
struct TupleStruct(String, Profile);

/// Plain types inside tuples, wrappers and custom serializers are fine.
#[derive(Serialize, Encrypted)]
struct PlainInside {
    pair: (String, u8),
    wrapped: Wrapper<String>,
    #[serde(serialize_with = "as_text2")]
    profile_text: Profile2,
}

#[derive(Serialize, Encrypted)]
struct Profile2 {
    city: String,
}

fn as_text2<S: serde::Serializer>(p: &Profile2, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.city)
}

#[test]
fn fail_nested_marks_a_schema_cannot_place() {
    let mut paths: Vec<String> = Spelled::schema()
        .rules()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    paths.sort_unstable();
    let mut expected: Vec<String> = ["aliased", "boxed", "locked", "borrowed", "many"]
        .iter()
        .flat_map(|f| [format!("{f}.notes"), format!("{f}.phone")])
        .collect();
    expected.sort_unstable();
    assert_eq!(paths, expected);

    let (path, reason) = schema_error::<InTuple>();
    assert_eq!(path, "pair.phone");
    assert!(reason.contains("tuple"), "{reason}");
    let (path, reason) = schema_error::<InWrapper>();
    assert_eq!(path, "wrapped.phone");
    assert!(reason.contains("`Wrapper`"), "{reason}");
    let (path, reason) = schema_error::<CustomSerialized>();
    assert_eq!(path, "profile.phone");
    assert!(reason.contains("serialize_with"), "{reason}");
    let (path, reason) = schema_error::<TupleStruct>();
    assert_eq!(path, "phone");
    assert!(reason.contains("tuple"), "{reason}");
    assert!(PlainInside::try_schema().unwrap().rules().is_empty());
}

#[test]
fn a_derived_schema_round_trips_through_the_file_formats() {
    for s in [User::schema(), Renamed::schema(), Payment::schema()] {
        let toml = s.to_toml_string();
        let back = Schema::from_toml_str(&toml).unwrap();
        assert_eq!(sorted(&back), sorted(&s), "{toml}");
        assert_eq!(back.owner_field(), s.owner_field());
    }
    for s in [User::schema(), Payment::schema()] {
        let back = Schema::from_json_str(&s.to_json_string()).unwrap();
        assert_eq!(sorted(&back), sorted(&s));
    }
    let toml = User::schema().to_toml_string();
    assert!(toml.contains("owner_field = \"tenant_id\""), "{toml}");
    assert!(toml.contains("[fields.\"tags.$[]\"]"), "{toml}");
}

/// `target/<profile>/examples/<name>`, next to this test's `deps/` directory (cargo builds
/// the examples before it runs the tests).
fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

#[test]
fn the_schema_file_example_prints_the_derived_schema_as_a_file() {
    // The example's `User` is the issue's, as defined here.
    let out = std::process::Command::new(example("schema_file"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = String::from_utf8(out.stdout).unwrap();
    let printed = Schema::from_toml_str(&toml).unwrap();
    assert_eq!(sorted(&printed), sorted(&User::schema()), "{toml}");
    assert_eq!(printed.owner_field(), Some("tenant_id"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.json");
    let out = std::process::Command::new(example("schema_file"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sorted(&Schema::load(&file).unwrap()),
        sorted(&User::schema())
    );
    let bad = std::process::Command::new(example("schema_file"))
        .arg(dir.path().join("users.yaml"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// The derive's checks and the builder's, on the same rules: both accept or both refuse.
#[test]
fn fail_deterministic_with_a_randomized_algorithm_in_the_derive() {
    let spec = |algorithm: &str| rules::RuleSpec {
        path: "a".into(),
        key: Some("k".into()),
        algorithm: Some(algorithm.into()),
        deterministic: true,
        ..rules::RuleSpec::default()
    };
    let why = rules::check_rule(&spec("ChaCha20-Poly1305")).unwrap_err();
    assert!(why.contains("contradicts"), "{why}");
    // The file format says the same of the same rule.
    let toml = "[fields.a]\nkey = 'k'\ndeterministic = true\nalgorithm = 'ChaCha20-Poly1305'";
    assert!(Schema::from_toml_str(toml).is_err());
    assert!(rules::check_rule(&spec("AES-256-SIV-deterministic")).is_ok());
}

#[test]
fn the_derive_checks_agree_with_the_builder() {
    use rules::{IndexSpec, RuleSpec};
    let r = |path: &str, key: Option<&str>| RuleSpec {
        path: path.into(),
        key: key.map(Into::into),
        ..RuleSpec::default()
    };
    let bi = |key: &str| {
        Some(IndexSpec {
            key: key.into(),
            ..IndexSpec::default()
        })
    };
    let k = Some("k");
    let cases: Vec<(Vec<RuleSpec>, Option<&str>)> = vec![
        (vec![r("a", k)], None),
        (vec![r("a", k), r("a.b", k)], None),
        (vec![r("a", k), r("a", k)], None),
        (vec![r("a.b", k), r("a.c", k)], None),
        (vec![r("_id", k)], None),
        (vec![r("_id.x", k)], None),
        (vec![r("", k)], None),
        (vec![r("a..b", k)], None),
        (vec![r("$a", k)], None),
        (vec![r("$[].a", k)], None),
        (vec![r("a.$[]", k)], None),
        (vec![r("a.$[].b", k)], None),
        (vec![r("a.$x", k)], None),
        (vec![r("a\0", k)], None),
        (vec![r("a", Some(""))], None),
        (vec![r("a", None)], None),
        (
            vec![RuleSpec {
                deterministic: true,
                bind_id: true,
                ..r("a", k)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                algorithm: Some("aes-256-siv-deterministic".into()),
                bind_id: true,
                ..r("a", k)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                algorithm: Some("ChaCha20-Poly1305".into()),
                bind_id: true,
                ..r("a", k)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                algorithm: Some("ROT13".into()),
                ..r("a", k)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                algorithm: Some("AES-256-GCM".into()),
                ..r("a", None)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                pad_to: Some(0),
                ..r("a", k)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                pad_to: Some(65536),
                ..r("a", k)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                pad_to: Some(65537),
                ..r("a", k)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                pad_to: Some(8),
                ..r("a", None)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                bind_id: true,
                blind_index: bi("t"),
                ..r("a", None)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                blind_index: bi("t"),
                ..r("a", None)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                blind_index: bi("k"),
                ..r("a", k)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                blind_index: bi(""),
                ..r("a", None)
            }],
            None,
        ),
        (
            vec![RuleSpec {
                blind_index: bi("t"),
                ..r("a.$[]", k)
            }],
            None,
        ),
        (
            vec![
                RuleSpec {
                    blind_index: bi("t"),
                    ..r("a", None)
                },
                r("a_bidx", k),
            ],
            None,
        ),
        (
            vec![RuleSpec {
                blind_index: bi("t"),
                ..r("p.a", None)
            }],
            Some("p"),
        ),
        (vec![r("a", k)], Some("o")),
        (vec![r("a", k)], Some("a")),
        (vec![r("a.b", k)], Some("a")),
        (vec![r("a", k)], Some("_id")),
        (vec![r("a", k)], Some("x.y")),
        (vec![r("a", k)], Some("")),
        (vec![r("a", k)], Some("$o")),
    ];
    let mut cases = cases;
    for (t, name) in [
        (4, None),
        (8, None),
        (32, None),
        (33, None),
        (16, Some("x")),
    ]
    .into_iter()
    .chain([(16, Some("")), (16, Some("a.b")), (16, Some("$x"))])
    {
        cases.push((
            vec![RuleSpec {
                blind_index: Some(IndexSpec {
                    key: "t".into(),
                    name: name.map(Into::into),
                    truncate: Some(t),
                }),
                ..r("a", None)
            }],
            None,
        ));
    }
    let mut refused = 0;
    for (specs, owner) in &cases {
        let derive = rules::check_schema(specs, *owner).is_ok();
        let mut b = Schema::builder();
        if let Some(o) = owner {
            b = b.owner_field(*o);
        }
        let mut library_input_ok = true;
        for s in specs {
            match field_of(s) {
                Some(f) => b = b.field(s.path.clone(), f),
                None => library_input_ok = false,
            }
        }
        let library = library_input_ok && b.build().is_ok();
        assert_eq!(derive, library, "{specs:?} owner {owner:?}");
        refused += usize::from(!derive);
    }
    assert!(refused > 25, "{refused}");
}

/// The library's `Field` for a spec, as the file format builds it (`None`: the file format
/// refuses it before the builder: an unknown suite, or a suite without a key).
fn field_of(s: &rules::RuleSpec) -> Option<Field> {
    let suite = match &s.algorithm {
        Some(a) => Some(a.parse::<Suite>().ok()?),
        None => None,
    };
    let det = s.deterministic || suite.is_some_and(Suite::is_deterministic);
    let mut f = match (&s.key, det) {
        (Some(k), true) => Field::deterministic(k.clone()),
        (Some(k), false) => Field::randomized(k.clone()).suite(suite.unwrap_or(Suite::Aes256Gcm)),
        (None, _) if suite.is_some() || s.deterministic => return None,
        (None, _) => Field {
            encrypt: None,
            bind_id: false,
            pad_to: None,
            blind_index: None,
        },
    };
    f.bind_id = s.bind_id;
    f.pad_to = s.pad_to.map(|p| u32::try_from(p).unwrap());
    f.blind_index = s.blind_index.as_ref().map(|b| BlindIndex {
        key: b.key.clone(),
        name: b.name.clone(),
        truncate: b.truncate.map(|t| usize::try_from(t).unwrap()),
    });
    Some(f)
}
