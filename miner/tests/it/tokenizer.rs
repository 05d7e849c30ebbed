//! The committed tokenizer: prompt tokens are a prefix of prompt+answer
//! tokens (so greedy decoding from a user's prompt sees what training saw),
//! digits are single tokens, and text round-trips.

use std::path::Path;

use web_node::eval::{self, Corpus};

#[test]
fn prompt_tokens_are_a_prefix_and_text_round_trips() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default/tokenizer.json");
    let tok = tokenizers::Tokenizer::from_file(&path).unwrap();
    let corpus = Corpus::default_corpus();
    let eos = eval::eos_id(&tok).unwrap();
    for ex in corpus
        .public_eval
        .iter()
        .chain(&corpus.held_out)
        .chain(corpus.train.iter().step_by(50))
    {
        let t = &eval::tokenize(&tok, std::slice::from_ref(ex)).unwrap()[0];
        let joint = eval::encode(&tok, &ex.text()).unwrap();
        let mut split = t.prompt.clone();
        split.extend_from_slice(&t.answer[..t.answer.len() - 1]);
        assert_eq!(joint, split, "{:?}", ex.text());
        assert_eq!(*t.answer.last().unwrap(), eos);
        assert_eq!(tok.decode(&joint, true).unwrap(), ex.text());
    }
    let digits = eval::encode(&tok, "Q: 1234+56=? A:").unwrap();
    let pieces: Vec<String> = digits
        .iter()
        .map(|&i| tok.id_to_token(i).unwrap())
        .collect();
    for d in ["1", "2", "3", "4", "5", "6"] {
        assert!(pieces.iter().any(|p| p == d), "{pieces:?}");
    }
}
