//! Seeded filler narrative: sentences about people, places and things that carry no number,
//! so a question lengthened with them keeps its answer; and a cheap token estimate to size
//! them before any tokenizer exists.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

const NAMES: [&str; 24] = [
    "Mia", "Leo", "Ava", "Sam", "Emma", "Noah", "Lily", "Omar", "Zoe", "Ben", "Nina", "Ivan",
    "Hana", "Raj", "Elena", "Tom", "Aisha", "Carlos", "Yuki", "Peter", "Grace", "Malik", "Sofia",
    "Jonas",
];
const PLACES: [&str; 16] = [
    "the harbour town",
    "a quiet village",
    "the old mill",
    "the city library",
    "the hill farm",
    "the riverside market",
    "a mountain school",
    "the train station",
    "the town square",
    "the seaside cottage",
    "the busy bakery",
    "the botanical garden",
    "the community hall",
    "the old lighthouse",
    "the corner shop",
    "the football ground",
];
const TIMES: [&str; 12] = [
    "every morning",
    "on weekends",
    "after school",
    "before sunrise",
    "in the evening",
    "during the holidays",
    "each spring",
    "on rainy days",
    "at lunchtime",
    "late at night",
    "in the autumn",
    "whenever the weather is fine",
];
const ACTIVITIES: [&str; 20] = [
    "walks along the river",
    "paints small pictures",
    "repairs old bicycles",
    "reads long novels",
    "plays the violin",
    "helps at the bakery",
    "collects smooth stones",
    "writes letters to friends",
    "feeds the neighbour's cat",
    "sweeps the front steps",
    "tends the vegetable patch",
    "sings in the choir",
    "practises chess openings",
    "bakes bread for the family",
    "waters the window boxes",
    "sorts the post",
    "visits the museum",
    "rides a blue scooter",
    "sketches the clouds",
    "studies the map of the region",
];
const THINGS: [&str; 18] = [
    "lantern",
    "wooden bridge",
    "blue door",
    "garden wall",
    "clock tower",
    "fishing boat",
    "stone well",
    "market stall",
    "apple tree",
    "red kite",
    "iron gate",
    "weather vane",
    "music box",
    "glass jar",
    "woollen scarf",
    "reading lamp",
    "copper kettle",
    "paper boat",
];
const ADJECTIVES: [&str; 16] = [
    "old", "bright", "quiet", "narrow", "busy", "small", "tall", "crooked", "painted", "famous",
    "dusty", "shiny", "gentle", "curious", "ancient", "cheerful",
];
const TOPICS: [&str; 14] = [
    "the weather",
    "the harvest",
    "a new recipe",
    "the football match",
    "the school play",
    "the river flood",
    "the summer fair",
    "a lost umbrella",
    "the price of bread",
    "the new bus route",
    "an old legend",
    "the village choir",
    "the winter festival",
    "a strange noise in the attic",
];
const FEELINGS: [&str; 10] = [
    "happy", "tired", "curious", "proud", "calm", "excited", "hopeful", "puzzled", "relaxed",
    "busy",
];
const REALMS: [&str; 8] = [
    "Berland",
    "Byteland",
    "Codeville",
    "Flatland",
    "Treeland",
    "Arrayburg",
    "Bitgrad",
    "the Kingdom of Loops",
];
const ROLES: [&str; 10] = [
    "merchant",
    "librarian",
    "engineer",
    "wizard",
    "gardener",
    "courier",
    "scientist",
    "chef",
    "cartographer",
    "archivist",
];
const CHORES: [&str; 10] = [
    "keeps careful records of every delivery",
    "studies long lists of values",
    "arranges books on endless shelves",
    "counts the visitors at the city gates",
    "builds machines that sort things",
    "writes strange messages on paper strips",
    "checks the accounts of the royal treasury",
    "plans routes for the postal carts",
    "labels every jar in the storehouse",
    "measures the towers of the old castle",
];

/// Which kind of story the sentences tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// Everyday life: the setting of a word problem.
    Everyday,
    /// A programming contest legend: kingdoms, roles and chores, with everyday sentences mixed in.
    Contest,
}

fn pick<'a>(rng: &mut ChaCha8Rng, items: &[&'a str]) -> &'a str {
    items[rng.gen_range(0..items.len() as u32) as usize]
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// One everyday sentence.
fn everyday(rng: &mut ChaCha8Rng) -> String {
    let name = pick(rng, &NAMES);
    match rng.gen_range(0..8u32) {
        0 => format!(
            "{name} lives near {} and {} {}.",
            pick(rng, &PLACES),
            pick(rng, &ACTIVITIES),
            pick(rng, &TIMES)
        ),
        1 => capitalize(&format!(
            "{}, the {} {} near {} looks {}.",
            pick(rng, &TIMES),
            pick(rng, &ADJECTIVES),
            pick(rng, &THINGS),
            pick(rng, &PLACES),
            pick(rng, &ADJECTIVES)
        )),
        2 => format!(
            "{name} often talks with {} about {}.",
            pick(rng, &NAMES),
            pick(rng, &TOPICS)
        ),
        3 => capitalize(&format!(
            "people in {} still remember the {} {}.",
            pick(rng, &PLACES),
            pick(rng, &ADJECTIVES),
            pick(rng, &THINGS)
        )),
        4 => format!(
            "{name} feels {} {} and {}.",
            pick(rng, &FEELINGS),
            pick(rng, &TIMES),
            pick(rng, &ACTIVITIES)
        ),
        5 => capitalize(&format!(
            "the story of the {} {} is well known in {}.",
            pick(rng, &ADJECTIVES),
            pick(rng, &THINGS),
            pick(rng, &PLACES)
        )),
        6 => format!(
            "{name} and {} agree that {} matters more than anything else this week.",
            pick(rng, &NAMES),
            pick(rng, &TOPICS)
        ),
        _ => format!(
            "Nobody is sure who left the {} {} at {}, but everyone likes it.",
            pick(rng, &ADJECTIVES),
            pick(rng, &THINGS),
            pick(rng, &PLACES)
        ),
    }
}

/// One contest-legend sentence.
fn contest(rng: &mut ChaCha8Rng) -> String {
    let name = pick(rng, &NAMES);
    let realm = pick(rng, &REALMS);
    match rng.gen_range(0..6u32) {
        0 => format!(
            "In {realm}, {name} the {} {}.",
            pick(rng, &ROLES),
            pick(rng, &CHORES)
        ),
        1 => format!("The ruler of {realm} has asked {name} for help once again."),
        2 => format!(
            "{name} does not like doing the same work twice, so {name} wants a program that does it."
        ),
        3 => format!(
            "Rumours say that the {} {} of {realm} hides a puzzle.",
            pick(rng, &ADJECTIVES),
            pick(rng, &THINGS)
        ),
        4 => format!(
            "Every {} in {realm} knows that {name} {}.",
            pick(rng, &ROLES),
            pick(rng, &CHORES)
        ),
        _ => everyday(rng),
    }
}

/// Sentences of `flavour` until they reach about `tokens` tokens (by [`estimate_tokens`]),
/// grouped into paragraphs of a few sentences; empty when `tokens` is 0.
pub fn narrative(rng: &mut ChaCha8Rng, flavour: Flavour, tokens: usize) -> String {
    let mut text = String::new();
    let mut estimate = 0;
    let mut in_paragraph = 0;
    while estimate < tokens {
        let sentence = match flavour {
            Flavour::Everyday => everyday(rng),
            Flavour::Contest => contest(rng),
        };
        let separator = if text.is_empty() {
            ""
        } else if in_paragraph >= 4 && rng.gen_range(0..3u32) == 0 {
            in_paragraph = 0;
            "\n\n"
        } else {
            " "
        };
        estimate += estimate_tokens(separator) + estimate_tokens(&sentence);
        text.push_str(separator);
        text.push_str(&sentence);
        in_paragraph += 1;
    }
    text
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Digit,
    Space,
    Newline,
    Other,
}

fn class(c: char) -> Class {
    if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Digit
    } else if c == '\n' || c == '\r' {
        Class::Newline
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    }
}

/// About how many tokens a byte-level BPE with Qwen2's pre-tokenizer gives `text` once its
/// words are in the vocabulary: one per word (with the space or punctuation mark before it),
/// per digit, per run of other symbols and per run of newlines. The stand-in's tokenizer is
/// trained on text made of the same words, so its counts come close (a test checks how close).
pub fn estimate_tokens(text: &str) -> usize {
    let mut count = 0;
    let mut previous = Class::Space;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let current = class(c);
        match current {
            Class::Letter if previous != Class::Letter => count += 1,
            Class::Digit => count += 1,
            Class::Newline if previous != Class::Newline => count += 1,
            Class::Other if previous != Class::Other => {
                // One mark right before a word is part of the word's piece.
                let joins_word = chars
                    .peek()
                    .is_some_and(|&next| class(next) == Class::Letter);
                if !joins_word {
                    count += 1;
                }
            }
            _ => {}
        }
        previous = current;
    }
    count
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn estimates_count_words_digits_and_symbol_runs() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("Mia has apples."), 4);
        assert_eq!(estimate_tokens("Mia has 123 apples."), 7);
        assert_eq!(estimate_tokens("a\n\nb"), 3);
        assert_eq!(estimate_tokens("x = (y)"), 4);
    }

    #[test]
    fn narratives_reach_the_length_and_carry_no_digit() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for flavour in [Flavour::Everyday, Flavour::Contest] {
            for tokens in [0, 1, 40, 300] {
                let text = narrative(&mut rng, flavour, tokens);
                let estimate = estimate_tokens(&text);
                assert!(
                    estimate >= tokens && estimate < tokens + 40,
                    "{tokens}: {text}"
                );
                assert!(!text.chars().any(|c| c.is_ascii_digit()), "{text}");
            }
        }
    }
}
