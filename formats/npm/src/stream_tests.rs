//! Unit tests of the publish-body scanner and the tarball stream.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use granary_format::hashing::{MultiHasher, hash_bytes};
use granary_format::testing::MemRegistry;
use serde_json::{Value, json};

use super::*;

/// A tarball-like payload: gzip magic, then `len - 2` bytes from a seeded generator.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut data = vec![0x1f, 0x8b];
    while data.len() < len {
        // xorshift64: deterministic, and no base64 symbol pattern repeats.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    data
}

/// A publish document as libnpmpublish shapes it, with `data` spliced in verbatim (so a
/// test can choose its escapes).
fn document(data_literal: &str) -> String {
    format!(
        r#"{{"_id":"p","name":"p","description":"d \"q\" \\ é","dist-tags":{{"latest":"1.0.0"}},"versions":{{"1.0.0":{{"name":"p","version":"1.0.0","n":[1,-2.5e3,true,false,null,{{}},[]]}}}},"access":null,"_attachments":{{"p-1.0.0.tgz":{{"content_type":"application/octet-stream","data":"{data_literal}","length":7}}}}}}"#
    )
}

/// Scans `pieces` in order; the skeleton (as JSON) and the decoded bytes, or the error.
fn scan_pieces<'a>(
    pieces: impl IntoIterator<Item = &'a [u8]>,
    limit: usize,
) -> Result<(Scanned, Vec<u8>), ScanError> {
    let mut scanner = Scanner::new(limit);
    let mut out = Vec::new();
    for piece in pieces {
        scanner.feed(piece, &mut out)?;
    }
    Ok((scanner.finish()?, out))
}

fn scan_whole(doc: &[u8]) -> Result<(Scanned, Vec<u8>), ScanError> {
    scan_pieces([doc], SKELETON_LIMIT)
}

fn skeleton_json(scanned: &Scanned) -> Value {
    serde_json::from_slice(&scanned.skeleton).expect("the skeleton is JSON")
}

/// The document with its tarball's `data` emptied, as the skeleton should read.
fn without_data(doc: &str) -> Value {
    let mut v: Value = serde_json::from_str(doc).expect("test document is JSON");
    if let Some(Value::Object(attachments)) = v.get_mut("_attachments") {
        for a in attachments.values_mut() {
            if a.get("data").is_some_and(Value::is_string) {
                a["data"] = json!("");
            }
        }
    }
    v
}

#[test]
fn splits_at_every_byte_position() {
    let tarball = payload(7, 1);
    let b64 = BASE64.encode(&tarball);
    let doc = document(&b64);
    let (whole, decoded) = scan_whole(doc.as_bytes()).unwrap();
    assert_eq!(decoded, tarball);
    assert_eq!(skeleton_json(&whole), without_data(&doc));
    assert_eq!(
        whole.tarball,
        Some(Tarball {
            size: 7,
            invalid_base64: None,
            gzip: true
        })
    );
    let bytes = doc.as_bytes();
    for at in 0..=bytes.len() {
        let (head, tail) = bytes.split_at(at);
        let (split, out) = scan_pieces([head, tail], SKELETON_LIMIT).unwrap();
        assert_eq!(split.skeleton, whole.skeleton, "split at {at}");
        assert_eq!(out, tarball, "split at {at}");
        assert_eq!(split.tarball, whole.tarball, "split at {at}");
    }
    let (one_by_one, out) = scan_pieces(bytes.chunks(1), SKELETON_LIMIT).unwrap();
    assert_eq!(one_by_one.skeleton, whole.skeleton);
    assert_eq!(out, tarball);
}

#[test]
fn escapes_in_data_split_anywhere() {
    // `\/` for every slash (some encoders escape it), a `\u` escape for a symbol, and
    // escaped whitespace at the end, which the old whole-string decode trimmed.
    let tarball = [0x1f, 0x8b, 0xff, 0xfe, 0xfd, 0x3f, 0xbf, 0xff];
    let b64 = BASE64.encode(tarball);
    assert!(b64.contains('/'), "{b64}");
    let rest = b64.strip_prefix('H').expect("gzip base64 starts with H");
    let escaped = format!("\\u0020\\u0048{}\\n\\r\\t ", rest.replace('/', "\\/"));
    let doc = document(&escaped).replace("\"length\":7", "\"length\":8");
    let bytes = doc.as_bytes();
    for at in 0..=bytes.len() {
        let (head, tail) = bytes.split_at(at);
        let (scanned, out) = scan_pieces([head, tail], SKELETON_LIMIT).unwrap();
        assert_eq!(out, tarball, "split at {at}");
        assert_eq!(scanned.tarball.as_ref().map(|t| t.gzip), Some(true));
        assert_eq!(skeleton_json(&scanned), without_data(&doc), "split at {at}");
    }
}

#[test]
fn escaped_keys_are_recognised() {
    let b64 = BASE64.encode(payload(10, 2));
    let doc = format!(r#"{{"\u005fattachments":{{"p-1.0.0.tgz":{{"d\u0061ta":"{b64}"}}}}}}"#);
    let (scanned, out) = scan_whole(doc.as_bytes()).unwrap();
    assert_eq!(out, payload(10, 2));
    assert_eq!(
        skeleton_json(&scanned),
        json!({"_attachments": {"p-1.0.0.tgz": {"data": ""}}})
    );
}

#[test]
fn whitespace_variants() {
    let tarball = payload(1000, 3);
    let compact = document(&BASE64.encode(&tarball));
    let value: Value = serde_json::from_str(&compact).unwrap();
    let pretty = serde_json::to_string_pretty(&value).unwrap();
    let crlf_tabs = pretty.replace('\n', "\r\n").replace("  ", "\t");
    let padded = format!(" \n\t{compact}\r\n ");
    let spaced = compact
        .replace(':', " : ")
        .replace(',', " ,\n ")
        .replace('{', "{ ")
        .replace('}', " }")
        .replace('[', "[ ")
        .replace(']', " ]");
    let expected = without_data(&compact);
    for (what, doc) in [
        ("pretty", pretty),
        ("crlf and tabs", crlf_tabs),
        ("padded", padded),
        ("spaced", spaced),
    ] {
        let (scanned, out) = scan_whole(doc.as_bytes()).unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(out, tarball, "{what}");
        assert_eq!(skeleton_json(&scanned), expected, "{what}");
    }
}

#[test]
fn attachment_before_versions() {
    let tarball = payload(300, 4);
    let doc = json!({
        "_attachments": {"p-1.0.0.tgz": {"data": BASE64.encode(&tarball), "length": 300}},
        "versions": {"1.0.0": {"name": "p", "dist": {"shasum": "x"}}},
        "name": "p"
    })
    .to_string();
    assert!(doc.find("_attachments") < doc.find("versions"));
    let (scanned, out) = scan_whole(doc.as_bytes()).unwrap();
    assert_eq!(out, tarball);
    assert_eq!(skeleton_json(&scanned), without_data(&doc));
}

#[test]
fn documents_without_attachments() {
    for doc in [
        json!({"name": "p", "versions": {"1.0.0": {"deprecated": "use 2"}}}),
        json!({"name": "p", "_attachments": {}}),
        json!({"name": "p", "_attachments": null}),
        json!({"name": "p", "_attachments": []}),
        json!({}),
        json!([]),
        json!("just a string"),
        json!(42),
        json!(null),
    ] {
        let text = doc.to_string();
        let (scanned, out) = scan_whole(text.as_bytes()).unwrap();
        assert!(out.is_empty(), "{text}");
        assert_eq!(scanned.tarball, None, "{text}");
        assert_eq!(scanned.data_strings, 0, "{text}");
        assert_eq!(skeleton_json(&scanned), doc, "{text}");
    }
}

#[test]
fn odd_shapes_are_copied_for_the_parse_to_refuse() {
    // `data` that is not a string, or not where npm puts it: copied, not streamed.
    for doc in [
        json!({"_attachments": {"f.tgz": {"data": 12}}}),
        json!({"_attachments": {"f.tgz": {"data": {"nested": "AAAA"}}}}),
        json!({"_attachments": {"f.tgz": {"data": ["AAAA"]}}}),
        json!({"_attachments": {"f.tgz": "AAAA"}}),
        json!({"_attachments": [{"data": "AAAA"}]}),
        json!({"versions": {"_attachments": {"f.tgz": {"data": "AAAA"}}}}),
        json!({"x": {"_attachments": {"f.tgz": {"data": "AAAA"}}}}),
        json!({"_attachments": {"f.tgz": {"meta": {"data": "AAAA"}}}}),
    ] {
        let text = doc.to_string();
        let (scanned, out) = scan_whole(text.as_bytes()).unwrap();
        assert!(out.is_empty(), "{text}");
        assert_eq!(scanned.tarball, None, "{text}");
        assert_eq!(skeleton_json(&scanned), doc, "{text}");
    }
}

#[test]
fn only_the_first_data_string_is_decoded() {
    let first = payload(5, 5);
    let doc = format!(
        r#"{{"_attachments":{{"a.tgz":{{"data":"{}"}},"b.tgz":{{"data":"{}"}}}}}}"#,
        BASE64.encode(&first),
        BASE64.encode(payload(9, 6))
    );
    let (scanned, out) = scan_whole(doc.as_bytes()).unwrap();
    assert_eq!(out, first);
    assert_eq!(scanned.data_strings, 2);
    assert_eq!(
        skeleton_json(&scanned),
        json!({"_attachments": {"a.tgz": {"data": ""}, "b.tgz": {"data": ""}}})
    );
    // The same file twice: one map entry once parsed, but two data strings seen.
    let dup = r#"{"_attachments":{"a.tgz":{"data":"H4s="},"a.tgz":{"data":"H4s="}}}"#;
    assert_eq!(scan_whole(dup.as_bytes()).unwrap().0.data_strings, 2);
}

#[test]
fn invalid_base64_is_reported_not_fatal() {
    for (data, why) in [
        ("%%% not base64 %%%", "Invalid symbol 37, offset 0."),
        ("H4sI!AAA", "Invalid symbol 33, offset 4."),
        ("H4s", "Invalid padding"),
        ("H4sIA", "Invalid padding"),
        ("H4==", "Invalid last symbol 52, offset 1."),
        ("H4sJ=AAA", "Invalid symbol 61, offset 4."),
        ("H4s=H", "Invalid symbol 72, offset 4."),
        ("H4s=H4s=", "Invalid symbol 72, offset 4."),
        ("H4sI AAAA", "Invalid symbol 32, offset 4."),
        ("=AAA", "Invalid symbol 61, offset 0."),
        ("H4sI\\u00e9", "Invalid symbol 195, offset 4."),
    ] {
        let doc = document(data);
        let (scanned, _) = scan_whole(doc.as_bytes()).unwrap_or_else(|e| panic!("{data}: {e:?}"));
        let tarball = scanned.tarball.as_ref().expect("a tarball");
        assert_eq!(tarball.invalid_base64.as_deref(), Some(why), "{data}");
        // The rest of the document was still scanned.
        assert_eq!(skeleton_json(&scanned), without_data(&doc), "{data}");
    }
}

/// Decodes `text` as a tarball's `data`, fed in pieces of `piece` bytes: the bytes, or
/// `None` when the scanner calls it invalid base64.
fn decode_as_data(text: &str, piece: usize) -> Option<Vec<u8>> {
    let doc = format!(r#"{{"_attachments":{{"f":{{"data":"{text}"}}}}}}"#);
    let (scanned, out) = scan_pieces(doc.as_bytes().chunks(piece), SKELETON_LIMIT).unwrap();
    let tarball = scanned.tarball.expect("a tarball");
    tarball.invalid_base64.is_none().then_some(out)
}

#[test]
fn base64_agrees_with_the_base64_crate() {
    // Accepted exactly when `STANDARD.decode(text.trim())` accepts it, to the same bytes,
    // however the text is split. First every string over a small alphabet up to 6
    // symbols (padding and whitespace included) ...
    let alphabet = [b'A', b'Q', b'/', b'=', b'z', b' '];
    let mut texts = Vec::new();
    for len in 0..=6u32 {
        for mut n in 0..alphabet.len().pow(len) {
            let mut text = Vec::new();
            for _ in 0..len {
                text.push(alphabet[n % alphabet.len()]);
                n /= alphabet.len();
            }
            texts.push(String::from_utf8(text).unwrap());
        }
    }
    // ... and every string up to 9 symbols of two symbols and padding, where padding
    // lands everywhere (`H4s=H4s=`-like texts among them) ...
    for len in 7..=9u32 {
        for mut n in 0..3usize.pow(len) {
            let mut text = String::new();
            for _ in 0..len {
                text.push(['A', 'B', '='][n % 3]);
                n /= 3;
            }
            texts.push(text);
        }
    }
    // ... then longer ones, mostly valid, with the odd byte that is not.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..3000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut text = BASE64.encode(x.to_le_bytes().repeat(1 + (x % 5) as usize));
        if x % 4 == 1 {
            // Two padded encodings end to end.
            text.push_str(&BASE64.encode(&x.to_le_bytes()[..1 + (x >> 3) as usize % 7]));
        }
        if x.is_multiple_of(3) {
            let at = (x >> 8) as usize % text.len();
            let odd = [b'=', b' ', b'%', b'-'][(x >> 16) as usize % 4];
            text.replace_range(at..=at, std::str::from_utf8(&[odd]).unwrap());
        }
        texts.push(text);
    }
    // ... and long ones, whose runs go through the vector decoder's wide paths, with an
    // odd byte anywhere in them.
    for _ in 0..400 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut text = BASE64.encode(x.to_le_bytes().repeat(20 + (x % 300) as usize));
        if !x.is_multiple_of(4) {
            let at = (x >> 8) as usize % text.len();
            let odd = [b'=', b' ', b'%', b'-', b'.', 0xc3][(x >> 16) as usize % 6];
            text.replace_range(at..=at, std::str::from_utf8(&[odd]).unwrap_or("\u{e9}"));
        }
        texts.push(text);
    }
    for text in &texts {
        let expected = BASE64.decode(text.trim()).ok();
        for piece in [usize::MAX, 3, 1] {
            assert_eq!(
                decode_as_data(text, piece),
                expected,
                "{text:?} in pieces of {piece}"
            );
        }
    }
}

#[test]
fn not_gzip_is_known_from_the_first_bytes() {
    let mut scanner = Scanner::new(SKELETON_LIMIT);
    let mut out = Vec::new();
    let zip = b"PK\x03\x04 not a tarball, and then some more";
    let doc = document(&BASE64.encode(zip));
    let (head, tail) = doc.split_at(doc.find("UEsD").unwrap() + 4);
    scanner.feed(head.as_bytes(), &mut out).unwrap();
    assert!(scanner.tarball_rejected(), "two bytes decoded: not gzip");
    scanner.feed(tail.as_bytes(), &mut out).unwrap();
    let tarball = scanner.finish().unwrap().tarball.unwrap();
    assert!(!tarball.gzip);
    assert_eq!(tarball.invalid_base64, None);
    assert_eq!(tarball.size, zip.len() as u64);

    for short in ["", "Hw=="] {
        let (scanned, _) = scan_whole(document(short).as_bytes()).unwrap();
        assert!(!scanned.tarball.unwrap().gzip, "{short:?}");
    }
}

#[test]
fn invalid_json_is_a_syntax_error() {
    let deep = "[".repeat(MAX_DEPTH + 1);
    for doc in [
        "",
        "   ",
        "{",
        "{\"a\"",
        "{\"a\":",
        "{\"a\":1",
        "{\"a\" 1}",
        "{\"a\":1,}",
        "{,}",
        "[1,]",
        "[1 2]",
        "{\"a\":1]",
        "[1}",
        "{1:2}",
        "{\"a\":\"unterminated",
        "{\"a\":\"bad \\x escape\"}",
        "{\"a\":\"bad \\u12g4 escape\"}",
        "{\"a\":\"raw \n newline\"}",
        "{} {}",
        "{}x",
        "}",
        "@",
        deep.as_str(),
        // In the tarball itself, too.
        "{\"_attachments\":{\"f\":{\"data\":\"H4sI\\q\"}}}",
        "{\"_attachments\":{\"f\":{\"data\":\"H4sI\tAAAA\"}}}",
        "{\"_attachments\":{\"f\":{\"data\":\"H4sIAAAA",
    ] {
        let whole = scan_whole(doc.as_bytes());
        assert!(
            matches!(whole, Err(ScanError::Syntax { .. })),
            "{doc:?}: {whole:?}"
        );
        let split = scan_pieces(doc.as_bytes().chunks(1), SKELETON_LIMIT);
        assert!(matches!(split, Err(ScanError::Syntax { .. })), "{doc:?}");
    }
    let err = FormatError::from(scan_whole(b"{\"a\" 1}").unwrap_err());
    assert_eq!(
        err.to_string(),
        "invalid package document: expected ':' after a key at byte 5"
    );
    assert_eq!(err.status(), 400);
}

#[test]
fn bad_tokens_pass_the_scan_and_fail_the_parse() {
    // Numbers and literals are the parse's to check.
    for doc in [
        "{\"a\":tru}",
        "{\"a\":01}",
        "{\"a\":-}",
        "[nul]",
        "{\"a\":1.2.3}",
    ] {
        let (scanned, _) = scan_whole(doc.as_bytes()).unwrap();
        assert!(
            serde_json::from_slice::<Value>(&scanned.skeleton).is_err(),
            "{doc}"
        );
    }
}

#[test]
fn the_skeleton_is_capped_but_not_the_tarball() {
    let big_manifest = json!({"name": "p", "readme": "x".repeat(2000)}).to_string();
    let err = scan_pieces([big_manifest.as_bytes()], 1000).unwrap_err();
    assert_eq!(err, ScanError::TooLarge { limit: 1000 });
    assert_eq!(FormatError::from(err).status(), 413);

    let tarball = payload(100_000, 7);
    let doc = document(&BASE64.encode(&tarball));
    let (scanned, out) = scan_pieces([doc.as_bytes()], 1000).unwrap();
    assert!(scanned.skeleton.len() < 1000);
    assert_eq!(out, tarball);

    // Whitespace between tokens is not kept either.
    let airy = format!("{{{}\"a\":1}}", " ".repeat(10_000));
    assert_eq!(
        scan_pieces([airy.as_bytes()], 100).unwrap().0.skeleton,
        b"{\"a\":1}"
    );
}

#[test]
fn multi_mib_attachment_in_odd_pieces() {
    let tarball = payload(5 * 1024 * 1024 + 5, 8);
    // Escape some slashes, as some encoders do, so escapes cross piece boundaries too.
    let b64 = BASE64.encode(&tarball).replacen('/', "\\/", 10_000);
    let doc = document(&b64).replace("\"length\":7", &format!("\"length\":{}", tarball.len()));
    let mut scanner = Scanner::new(SKELETON_LIMIT);
    let mut hasher = MultiHasher::new();
    let mut out = Vec::new();
    let mut rest = doc.as_bytes();
    for size in [1usize, 7, 4093, 65_537, 3, 131_071, 2].iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at((*size).min(rest.len()));
        scanner.feed(piece, &mut out).unwrap();
        assert!(out.len() <= piece.len() / 4 * 3 + 3, "bounded by the piece");
        hasher.update(&out);
        out.clear();
        rest = tail;
    }
    let scanned = scanner.finish().unwrap();
    let tarball_info = scanned.tarball.as_ref().unwrap();
    assert_eq!(tarball_info.size, tarball.len() as u64);
    assert!(tarball_info.gzip);
    assert_eq!(tarball_info.invalid_base64, None);
    assert_eq!(hasher.finish(), hash_bytes(&tarball));
    assert_eq!(skeleton_json(&scanned), without_data(&doc));
}

/// A body of `doc` in frames of `frame` bytes.
fn body_of(doc: Vec<u8>, frame: usize) -> Body {
    let frames: Vec<Result<Frame<Bytes>, BodyError>> = doc
        .chunks(frame)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    StreamBody::new(stream::iter(frames)).boxed_unsync()
}

#[tokio::test]
async fn a_finished_tarball_is_stored() {
    let repo = MemRegistry::new("http://x/", "alice");
    let tarball = payload(200_000, 9);
    let doc = document(&BASE64.encode(&tarball)).into_bytes();
    let (mut sender, receiver) = tarball_channel();
    let (scanned, stored) = futures::future::join(
        async {
            let scanned = scan(body_of(doc, 1000), usize::MAX, &mut sender).await;
            sender.finish().await;
            scanned
        },
        store_tarball(&repo, receiver, None),
    )
    .await;
    assert_eq!(scanned.unwrap().tarball.unwrap().size, 200_000);
    let info = stored.unwrap().expect("stored");
    assert_eq!(info.hashes, hash_bytes(&tarball));
    assert_eq!(
        repo.blob(&info.hashes.sha256).as_deref(),
        Some(&tarball[..])
    );
}

#[tokio::test]
async fn an_aborted_tarball_is_not_stored() {
    let repo = MemRegistry::new("http://x/", "alice");
    let doc = document(&BASE64.encode(payload(200_000, 10))).into_bytes();
    let (mut sender, receiver) = tarball_channel();
    let (scanned, stored) = futures::future::join(
        async {
            let scanned = scan(body_of(doc, 1000), usize::MAX, &mut sender).await;
            sender.abort();
            scanned
        },
        store_tarball(&repo, receiver, None),
    )
    .await;
    assert!(scanned.is_ok());
    assert!(stored.is_err(), "the store saw a failed body");
    assert_eq!(repo.blob_count(), 0);
}

#[tokio::test]
async fn no_tarball_stores_nothing() {
    let repo = MemRegistry::new("http://x/", "alice");
    let doc = json!({"name": "p", "versions": {}})
        .to_string()
        .into_bytes();
    let (mut sender, receiver) = tarball_channel();
    let (scanned, stored) = futures::future::join(
        async {
            let scanned = scan(body_of(doc, 3), usize::MAX, &mut sender).await;
            sender.finish().await;
            scanned
        },
        store_tarball(&repo, receiver, None),
    )
    .await;
    assert!(scanned.unwrap().tarball.is_none());
    assert_eq!(stored.unwrap(), None);
    assert_eq!(repo.blob_count(), 0);
}

#[tokio::test]
async fn limits_and_syntax_errors_of_a_body() {
    let doc = document(&BASE64.encode(payload(1000, 11))).into_bytes();
    // Nobody reads the tarball here: sends to a closed channel are dropped.
    let (mut sender, receiver) = tarball_channel();
    drop(receiver);
    let err = scan(body_of(doc.clone(), 100), 500, &mut sender)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 413);

    // A syntax error early on still reads the body to its end, and the limit still holds.
    let mut broken = b"{\"a\" 1,".to_vec();
    broken.extend_from_slice(&doc);
    let (mut sender, _receiver) = tarball_channel();
    let err = scan(body_of(broken.clone(), 100), usize::MAX, &mut sender)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 400);
    let (mut sender, _receiver) = tarball_channel();
    let err = scan(body_of(broken, 100), 500, &mut sender)
        .await
        .unwrap_err();
    assert_eq!(err.status(), 413);
}

#[test]
fn plain_runs_end_at_the_first_quote_backslash_or_control_byte() {
    let naive = |s: &[u8]| {
        s.iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
            .unwrap_or(s.len())
    };
    let base: Vec<u8> = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo+/0123456789abcdef"
        .iter()
        .cycle()
        .take(200)
        .copied()
        .collect();
    // Every stop byte at every position, including both sides of each block boundary,
    // and high bytes (UTF-8), which are plain.
    for stop in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
        for at in 0..base.len() {
            let mut s = base.clone();
            s[at] = stop;
            if at > 0 {
                s[at - 1] = 0xe9;
            }
            assert_eq!(plain_run(&s), at, "stop {stop:#x} at {at}");
            assert_eq!(plain_run(&s), naive(&s));
            assert_eq!(plain_run(&s[..at]), at);
        }
    }
    assert_eq!(plain_run(&base), base.len());
    assert_eq!(plain_run(b""), 0);
    assert_eq!(plain_run(b" !"), 2);
}
