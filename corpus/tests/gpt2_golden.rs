//! GPT-2 BPE against ids from OpenAI's tiktoken (`tools/golden/gpt2_tiktoken.py`).

use smelt_corpus::gpt2;
use smelt_corpus::Tokenizer;

#[test]
fn matches_tiktoken_token_for_token() {
    let fixture: serde_json::Value = serde_json::from_str(include_str!("fixtures/gpt2_golden.json")).unwrap();
    assert_eq!(fixture["eot"], 50256);
    assert_eq!(fixture["n_vocab"], 50257);
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let tok = Tokenizer::Gpt2;
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "text {text:?}");
        assert_eq!(tok.decode(&got).unwrap(), text);
    }
}

#[test]
fn long_text_in_safe_pieces_encodes_the_same() {
    // The pieces prepare tokenizes in parallel give exactly the whole text's ids.
    let fixture: serde_json::Value = serde_json::from_str(include_str!("fixtures/gpt2_golden.json")).unwrap();
    let mut text = String::new();
    for (i, case) in fixture["cases"].as_array().unwrap().iter().cycle().take(200).enumerate() {
        text.push_str(case["text"].as_str().unwrap());
        text.push_str(["\n", " ", "\n\n", "  ", " x\n"][i % 5]);
    }
    let whole = gpt2::encode(&text);
    let mut ids = Vec::new();
    let mut rest = text.as_str();
    let mut pieces = 0;
    while let Some(i) = gpt2::safe_split(rest, 97) {
        let (l, r) = rest.split_at(i);
        ids.extend(gpt2::encode(l));
        rest = r;
        pieces += 1;
    }
    ids.extend(gpt2::encode(rest));
    assert!(pieces > 20, "{pieces}");
    assert_eq!(ids, whole);
}

/// Random text from characters chosen to stress the pre-tokenizer: every class, whitespace of
/// several kinds and lengths, apostrophes and contraction letters, combining marks, non-ASCII
/// digits and letters, emoji.
fn random_text(state: &mut u64, len: usize) -> String {
    const ALPHABET: &[&str] = &[
        "a", "b", "Z", "s", "t", "d", "m", "l", "v", "e", "r", "'", "'", "’", " ", " ", " ", "  ", "\t", "\n", "\r\n", "\n\n",
        "\u{a0}", "\u{2003}", "\u{3000}", "\u{200b}", "\u{85}", "\u{1680}", "0", "7", "42", "٣", "½", "Ⅻ", "²", "é", "e\u{301}",
        "ß", "日", "本", "ㅎ", "ǅ", "ʰ", "·", ".", ",", "!", "?", "-", "—", "(", ")", "\"", "$", "€", "🎉", "👩\u{200d}👧",
        "\u{fe0f}", "𝔘", "\u{10ffff}", "'s", "'ll", "'ve", "'re", "'d", "'m", "'t", "'S", "'LL", " 's", "the", " the", "1,000",
    ];
    let mut s = String::new();
    for _ in 0..len {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        s.push_str(ALPHABET[(*state % ALPHABET.len() as u64) as usize]);
    }
    s
}

#[test]
fn agrees_with_tiktoken_rs_on_random_text() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..4000 {
        let text = random_text(&mut state, 1 + round % 40);
        assert_eq!(gpt2::encode(&text), gpt2::encode_reference(&text), "text {text:?}");
    }
    let long = random_text(&mut state, 20_000);
    assert_eq!(gpt2::encode(&long), gpt2::encode_reference(&long));
    // every single code point class boundary the table could get wrong, in context
    let mut probe = String::new();
    for cp in (0x80u32..0x3_0000).step_by(7) {
        if let Some(c) = char::from_u32(cp) {
            probe.push(c);
            probe.push(if cp % 3 == 0 { ' ' } else { 'a' });
        }
    }
    assert_eq!(gpt2::encode(&probe), gpt2::encode_reference(&probe));
}
