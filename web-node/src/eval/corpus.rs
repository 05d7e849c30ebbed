//! A deterministic corpus of skills with exact answers, made by project code
//! (no downloads), split once into train / public eval / held-out.
//!
//! Every example is a prompt and an answer in one fixed text format:
//! `"Q: 12+7=? A:"` + `" 19"`; the tokenizer appends the end-of-sequence
//! token after the answer. The three splits are disjoint by prompt.

use std::collections::BTreeSet;
use std::fmt;

/// The seed of the committed corpus (and of the default model's training).
pub const DEFAULT_SEED: u64 = 20_260_126;
/// Public-eval examples per skill (fewer for `capital`, whose space is small).
pub const PUBLIC_PER_SKILL: usize = 40;
/// Held-out examples per skill (fewer for `capital`).
pub const HELD_OUT_PER_SKILL: usize = 50;
/// Training examples per generated (non-enumerated) skill.
pub const TRAIN_PER_SKILL: usize = 6000;

/// A skill with exactly checkable answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Skill {
    /// `a+b` with `a, b` in 0..=99.
    Add,
    /// `a-b` with `0 <= b <= a <= 99`.
    Sub,
    /// Repeat 2-5 words.
    Copy,
    /// Reverse 2-5 words.
    Reverse,
    /// Sort 3-4 distinct words alphabetically.
    Sort,
    /// Count 1-8 words.
    Count,
    /// Capital of a country (a small fact table, three phrasings).
    Capital,
}

impl Skill {
    pub const ALL: [Skill; 7] = [
        Skill::Add,
        Skill::Sub,
        Skill::Copy,
        Skill::Reverse,
        Skill::Sort,
        Skill::Count,
        Skill::Capital,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Skill::Add => "add",
            Skill::Sub => "sub",
            Skill::Copy => "copy",
            Skill::Reverse => "reverse",
            Skill::Sort => "sort",
            Skill::Count => "count",
            Skill::Capital => "capital",
        }
    }

    /// Parse a skill name (as printed by [`Skill::name`]).
    pub fn parse(s: &str) -> Option<Skill> {
        Skill::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for Skill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One prompt with its exact answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub skill: Skill,
    /// The prompt's words come from the held-out generated words, which no
    /// training example ever contains ([`is_unseen_word`]).
    pub unseen: bool,
    /// Ends with `" A:"`.
    pub prompt: String,
    /// Starts with a space, e.g. `" 19"`.
    pub answer: String,
}

impl Example {
    /// Prompt and answer as one text (without the end-of-sequence token).
    pub fn text(&self) -> String {
        format!("{}{}", self.prompt, self.answer)
    }
}

/// The three disjoint splits.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub train: Vec<Example>,
    pub public_eval: Vec<Example>,
    pub held_out: Vec<Example>,
}

/// Words for the word skills: lower-case, distinct.
pub const WORDS: [&str; 32] = [
    "apple", "bird", "cat", "dog", "egg", "fish", "goat", "hat", "ice", "jam", "kite", "lamp",
    "moon", "nest", "owl", "pen", "queen", "rain", "sun", "tree", "umbrella", "van", "wolf", "box",
    "yak", "zoo", "red", "blue", "green", "milk", "star", "door",
];

/// The fact table: (country, capital).
pub const CAPITALS: [(&str, &str); 30] = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Russia", "Moscow"),
    ("India", "New Delhi"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Cuba", "Havana"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Australia", "Canberra"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Iran", "Tehran"),
];

/// Phrasings of the capital question; each fact is trained in two of them and
/// the third is kept for the public eval or the held-out split.
const CAPITAL_TEMPLATES: [&str; 3] = [
    "Q: capital of {}? A:",
    "Q: what is the capital of {}? A:",
    "Q: {} has which capital? A:",
];

/// Phrasings only ever trained, for every fact: more facts per phrasing, so
/// that a fact is tied to the country rather than to one phrasing.
const CAPITAL_TRAIN_TEMPLATES: [&str; 3] = [
    "Q: the capital of {} is? A:",
    "Q: which city is the capital of {}? A:",
    "Q: name the capital of {}. A:",
];

/// SplitMix64: a tiny, portable, deterministic generator (same stream on
/// every platform and in wasm).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// Uniform float in `[0, 1)`.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Consonants and vowels of the generated words.
const CONSONANTS: &[u8] = b"bdfgklmnprstvz";
const VOWELS: &[u8] = b"aeiou";

/// A generated word: 1 to 3 consonant-vowel syllables, sometimes closed by a
/// consonant (`fe`, `bado`, `kuzim`). 14 x 5 syllables give about 1.5 million
/// words, so a word skill trained on them cannot be a lookup.
pub fn generated_word(rng: &mut Rng) -> String {
    let syllables = 1 + rng.below(3);
    let mut w = String::with_capacity(2 * syllables + 1);
    for _ in 0..syllables {
        w.push(CONSONANTS[rng.below(CONSONANTS.len())] as char);
        w.push(VOWELS[rng.below(VOWELS.len())] as char);
    }
    if rng.below(4) == 0 {
        w.push(CONSONANTS[rng.below(CONSONANTS.len())] as char);
    }
    w
}

/// Whether a word belongs to the held-out generated words: a fixed eighth of
/// every possible generated word, chosen by a hash of its letters (FNV-1a,
/// then a SplitMix64 finaliser), so training can refuse them without a list
/// and every machine agrees. The known [`WORDS`] are never unseen.
pub fn is_unseen_word(w: &str) -> bool {
    if WORDS.contains(&w) {
        return false;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in w.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).is_multiple_of(8)
}

/// Where the words of a word-skill example come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WordSource {
    /// Only the known [`WORDS`] (the known-word eval prompts).
    Known,
    /// Known words and generated words that are not held out (training and
    /// the public eval): each word is known with probability 0.4.
    Train,
    /// Only held-out generated words (the unseen-word eval prompts).
    Unseen,
}

fn one_word(rng: &mut Rng, source: WordSource) -> String {
    match source {
        WordSource::Known => WORDS[rng.below(WORDS.len())].to_string(),
        WordSource::Train if rng.below(5) < 2 => WORDS[rng.below(WORDS.len())].to_string(),
        WordSource::Train => loop {
            let w = generated_word(rng);
            if !is_unseen_word(&w) {
                break w;
            }
        },
        WordSource::Unseen => loop {
            let w = generated_word(rng);
            if is_unseen_word(&w) {
                break w;
            }
        },
    }
}

fn words(rng: &mut Rng, n: usize, distinct: bool, source: WordSource) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(n);
    while out.len() < n {
        let w = one_word(rng, source);
        if distinct && out.contains(&w) {
            continue;
        }
        out.push(w);
    }
    out
}

/// Draw one random example of a generated skill.
fn sample(skill: Skill, rng: &mut Rng, source: WordSource) -> Example {
    let ex = |prompt: String, answer: String| Example {
        skill,
        unseen: source == WordSource::Unseen,
        prompt,
        answer,
    };
    match skill {
        Skill::Add => {
            let (a, b) = (rng.below(100), rng.below(100));
            ex(format!("Q: {a}+{b}=? A:"), format!(" {}", a + b))
        }
        Skill::Sub => {
            let (x, y) = (rng.below(100), rng.below(100));
            let (a, b) = (x.max(y), x.min(y));
            ex(format!("Q: {a}-{b}=? A:"), format!(" {}", a - b))
        }
        Skill::Copy => {
            let n = 2 + rng.below(4);
            let w = words(rng, n, false, source).join(" ");
            ex(format!("Q: copy {w} A:"), format!(" {w}"))
        }
        Skill::Reverse => {
            let n = 2 + rng.below(4);
            let w = words(rng, n, false, source);
            let mut r = w.clone();
            r.reverse();
            ex(
                format!("Q: reverse {} A:", w.join(" ")),
                format!(" {}", r.join(" ")),
            )
        }
        Skill::Sort => {
            let n = 3 + rng.below(2);
            let w = words(rng, n, true, source);
            let mut s = w.clone();
            s.sort_unstable();
            ex(
                format!("Q: sort {} A:", w.join(" ")),
                format!(" {}", s.join(" ")),
            )
        }
        Skill::Count => {
            let n = 1 + rng.below(8);
            let w = words(rng, n, false, source);
            ex(format!("Q: count {} A:", w.join(" ")), format!(" {n}"))
        }
        Skill::Capital => {
            let (c, cap) = CAPITALS[rng.below(CAPITALS.len())];
            let t = CAPITAL_TEMPLATES[rng.below(CAPITAL_TEMPLATES.len())];
            let _ = source;
            ex(t.replacen("{}", c, 1), format!(" {cap}"))
        }
    }
}

fn enumerate_arith(skill: Skill) -> Vec<Example> {
    let mut v = Vec::new();
    for a in 0..100usize {
        for b in 0..100usize {
            match skill {
                Skill::Add => v.push(Example {
                    skill,
                    unseen: false,
                    prompt: format!("Q: {a}+{b}=? A:"),
                    answer: format!(" {}", a + b),
                }),
                Skill::Sub if b <= a => v.push(Example {
                    skill,
                    unseen: false,
                    prompt: format!("Q: {a}-{b}=? A:"),
                    answer: format!(" {}", a - b),
                }),
                _ => {}
            }
        }
    }
    v
}

impl Corpus {
    /// Generate the corpus for a seed. Same seed, same corpus, on every platform.
    pub fn generate(seed: u64) -> Corpus {
        let mut rng = Rng::new(seed);
        let mut c = Corpus {
            train: Vec::new(),
            public_eval: Vec::new(),
            held_out: Vec::new(),
        };
        for skill in Skill::ALL {
            match skill {
                Skill::Add | Skill::Sub => {
                    let mut all = enumerate_arith(skill);
                    rng.shuffle(&mut all);
                    let rest = all.split_off(PUBLIC_PER_SKILL + HELD_OUT_PER_SKILL);
                    let held = all.split_off(PUBLIC_PER_SKILL);
                    c.public_eval.extend(all);
                    c.held_out.extend(held);
                    c.train.extend(rest);
                }
                Skill::Capital => {
                    // For each fact, one phrasing is kept out of training;
                    // those go alternately to public eval and held-out.
                    let mut order: Vec<usize> = (0..CAPITALS.len()).collect();
                    rng.shuffle(&mut order);
                    for (i, &f) in order.iter().enumerate() {
                        let (country, cap) = CAPITALS[f];
                        let kept = rng.below(CAPITAL_TEMPLATES.len());
                        // The phrasings that are only ever trained.
                        for extra in CAPITAL_TRAIN_TEMPLATES {
                            c.train.push(Example {
                                skill,
                                unseen: false,
                                prompt: extra.replacen("{}", country, 1),
                                answer: format!(" {cap}"),
                            });
                        }
                        for (t, tpl) in CAPITAL_TEMPLATES.iter().enumerate() {
                            let e = Example {
                                skill,
                                unseen: false,
                                prompt: tpl.replacen("{}", country, 1),
                                answer: format!(" {cap}"),
                            };
                            if t != kept {
                                c.train.push(e);
                            } else if i % 2 == 0 {
                                c.public_eval.push(e);
                            } else {
                                c.held_out.push(e);
                            }
                        }
                    }
                }
                _ => {
                    let mut seen = BTreeSet::new();
                    let mut draw =
                        |n: usize, out: &mut Vec<Example>, rng: &mut Rng, source: WordSource| {
                            let mut tries = 0usize;
                            let start = out.len();
                            while out.len() - start < n && tries < n * 50 {
                                tries += 1;
                                let e = sample(skill, rng, source);
                                if seen.insert(e.prompt.clone()) {
                                    out.push(e);
                                }
                            }
                        };
                    draw(
                        PUBLIC_PER_SKILL,
                        &mut c.public_eval,
                        &mut rng,
                        WordSource::Train,
                    );
                    draw(
                        HELD_OUT_PER_SKILL,
                        &mut c.held_out,
                        &mut rng,
                        WordSource::Known,
                    );
                    draw(
                        HELD_OUT_PER_SKILL,
                        &mut c.held_out,
                        &mut rng,
                        WordSource::Unseen,
                    );
                    draw(TRAIN_PER_SKILL, &mut c.train, &mut rng, WordSource::Train);
                }
            }
        }
        c
    }

    /// The committed corpus ([`DEFAULT_SEED`]).
    pub fn default_corpus() -> Corpus {
        Corpus::generate(DEFAULT_SEED)
    }

    /// Training examples of one skill.
    pub fn train_of(&self, skill: Skill) -> Vec<&Example> {
        self.train.iter().filter(|e| e.skill == skill).collect()
    }
}

/// Draws fresh training examples of the generated skills (copy, reverse,
/// sort, count), never one whose prompt is in the public-eval or held-out
/// split. The enumerated skills (add, sub, capital) have no fresh examples:
/// their train split is everything else.
#[derive(Debug, Clone)]
pub struct FreshSampler {
    excluded: BTreeSet<String>,
}

impl FreshSampler {
    pub fn new(corpus: &Corpus) -> Self {
        let excluded = corpus
            .public_eval
            .iter()
            .chain(&corpus.held_out)
            .map(|e| e.prompt.clone())
            .collect();
        Self { excluded }
    }

    /// Whether `skill` has fresh examples.
    pub fn generates(skill: Skill) -> bool {
        !matches!(skill, Skill::Add | Skill::Sub | Skill::Capital)
    }

    /// A fresh example of a generated skill (None for enumerated skills).
    pub fn sample(&self, skill: Skill, rng: &mut Rng) -> Option<Example> {
        if !Self::generates(skill) {
            return None;
        }
        for _ in 0..1000 {
            let e = sample(skill, rng, WordSource::Train);
            if !self.excluded.contains(&e.prompt) {
                return Some(e);
            }
        }
        None
    }
}

/// Only the examples of one skill.
pub fn of_skill(examples: &[Example], skill: Skill) -> Vec<Example> {
    examples
        .iter()
        .filter(|e| e.skill == skill)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn deterministic_and_disjoint() {
        let a = Corpus::generate(DEFAULT_SEED);
        let b = Corpus::generate(DEFAULT_SEED);
        assert_eq!(a.train, b.train);
        assert_eq!(a.held_out, b.held_out);
        let c = Corpus::generate(DEFAULT_SEED + 1);
        assert_ne!(a.held_out, c.held_out);

        let train: BTreeSet<&str> = a.train.iter().map(|e| e.prompt.as_str()).collect();
        let public: BTreeSet<&str> = a.public_eval.iter().map(|e| e.prompt.as_str()).collect();
        let held: BTreeSet<&str> = a.held_out.iter().map(|e| e.prompt.as_str()).collect();
        assert_eq!(
            public.len(),
            a.public_eval.len(),
            "public prompts are distinct"
        );
        assert_eq!(
            held.len(),
            a.held_out.len(),
            "held-out prompts are distinct"
        );
        assert!(train.is_disjoint(&public));
        assert!(train.is_disjoint(&held));
        assert!(public.is_disjoint(&held));
        for skill in Skill::ALL {
            assert!(!of_skill(&a.held_out, skill).is_empty(), "{skill}");
            assert!(!of_skill(&a.public_eval, skill).is_empty(), "{skill}");
            assert!(!a.train_of(skill).is_empty(), "{skill}");
        }
    }

    #[test]
    fn answers_are_exact() {
        let c = Corpus::default_corpus();
        for e in c.train.iter().chain(&c.held_out).chain(&c.public_eval) {
            assert!(
                e.prompt.starts_with("Q: ") && e.prompt.ends_with(" A:"),
                "{e:?}"
            );
            assert!(e.answer.starts_with(' '), "{e:?}");
            let body = e.prompt.trim_start_matches("Q: ").trim_end_matches(" A:");
            let ans = e.answer.trim();
            match e.skill {
                Skill::Add => {
                    let (a, b) = body.trim_end_matches("=?").split_once('+').unwrap();
                    let s: u32 = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
                    assert_eq!(ans, s.to_string());
                }
                Skill::Sub => {
                    let (a, b) = body.trim_end_matches("=?").split_once('-').unwrap();
                    let s: u32 = a.parse::<u32>().unwrap() - b.parse::<u32>().unwrap();
                    assert_eq!(ans, s.to_string());
                }
                Skill::Reverse => {
                    let mut w: Vec<&str> = body["reverse ".len()..].split(' ').collect();
                    w.reverse();
                    assert_eq!(ans, w.join(" "));
                }
                Skill::Sort => {
                    let mut w: Vec<&str> = body["sort ".len()..].split(' ').collect();
                    w.sort_unstable();
                    assert_eq!(ans, w.join(" "));
                }
                Skill::Count => {
                    assert_eq!(ans, body["count ".len()..].split(' ').count().to_string())
                }
                Skill::Copy => assert_eq!(ans, &body["copy ".len()..]),
                Skill::Capital => {
                    assert!(CAPITALS
                        .iter()
                        .any(|(c, cap)| body.contains(c) && *cap == ans))
                }
            }
        }
    }

    #[test]
    fn fresh_examples_avoid_eval_splits() {
        let c = Corpus::default_corpus();
        let f = FreshSampler::new(&c);
        let held: BTreeSet<&str> = c.held_out.iter().map(|e| e.prompt.as_str()).collect();
        let public: BTreeSet<&str> = c.public_eval.iter().map(|e| e.prompt.as_str()).collect();
        let mut rng = Rng::new(5);
        for skill in Skill::ALL {
            for _ in 0..2000 {
                match f.sample(skill, &mut rng) {
                    Some(e) => {
                        assert_eq!(e.skill, skill);
                        assert!(
                            !held.contains(e.prompt.as_str())
                                && !public.contains(e.prompt.as_str())
                        );
                    }
                    None => assert!(!FreshSampler::generates(skill)),
                }
            }
        }
    }

    #[test]
    fn skill_names_round_trip() {
        for s in Skill::ALL {
            assert_eq!(Skill::parse(s.name()), Some(s));
        }
        assert_eq!(Skill::parse("multiply"), None);
    }

    #[test]
    fn unseen_words_are_a_fixed_eighth_never_trained() {
        // The same answers as tests/e2e/lib.mjs's isUnseenWord (the browser
        // test draws its own unseen words with it).
        for w in ["fokemev", "dapezin", "pido", "mero"] {
            assert!(is_unseen_word(w), "{w}");
        }
        for w in ["bado", "kuzi", "fe", "cat", "lomet"] {
            assert!(!is_unseen_word(w), "{w}");
        }
        let mut rng = Rng::new(9);
        let n = 20_000;
        let unseen = (0..n)
            .filter(|_| is_unseen_word(&generated_word(&mut rng)))
            .count();
        assert!((n / 10..n / 6).contains(&unseen), "{unseen} of {n}");
        // No training example holds an unseen word.
        let c = Corpus::default_corpus();
        let f = FreshSampler::new(&c);
        for e in c
            .train
            .iter()
            .cloned()
            .chain((0..4000).filter_map(|i| f.sample(Skill::ALL[2 + i % 4], &mut rng)))
        {
            if !FreshSampler::generates(e.skill) {
                continue;
            }
            let body = e.prompt.trim_start_matches("Q: ").trim_end_matches(" A:");
            for w in body.split(' ').skip(1) {
                assert!(!is_unseen_word(w), "{w} in training prompt {:?}", e.prompt);
            }
        }
        for e in c.held_out.iter().filter(|e| e.unseen) {
            let body = e.prompt.trim_start_matches("Q: ").trim_end_matches(" A:");
            assert!(
                body.split(' ').skip(1).all(is_unseen_word),
                "{:?}",
                e.prompt
            );
        }
    }
}
