//! What counts as a printable identifier character.
//!
//! Identifiers that clients send (`customer_id`, `sku`) are shown to people
//! and compared byte for byte. Characters that print nothing, or that change
//! how the text around them reads, make two identifiers look the same while
//! they differ (or hide a reversed string), so they are refused.

/// True unless `c` is a control character, an invisible format character
/// (a byte-order mark, a zero-width space, a bidirectional override), a line
/// or paragraph separator, a Unicode noncharacter, or a tag character.
///
/// The zero-width joiner and non-joiner (U+200C, U+200D) stay allowed: some
/// scripts and emoji sequences need them.
pub fn is_printable(c: char) -> bool {
    if c.is_control() {
        return false;
    }
    let u = u32::from(c);
    let invisible = matches!(
        u,
        0x00AD                  // soft hyphen
        | 0x061C                // Arabic letter mark
        | 0x180E                // Mongolian vowel separator
        | 0x200B | 0x200E | 0x200F // zero-width space, LRM, RLM
        | 0x2028..=0x202E       // separators, bidirectional embeddings and overrides
        | 0x2060..=0x206F       // word joiner, invisible operators, bidi isolates
        | 0xFEFF                // byte-order mark
        | 0xFFF9..=0xFFFB       // interlinear annotation
        | 0xE0000..=0xE007F // tag characters
    );
    let noncharacter = (0xFDD0..=0xFDEF).contains(&u) || (u & 0xFFFE) == 0xFFFE;
    !(invisible || noncharacter)
}

/// True if every character of `s` [`is_printable`].
pub fn all_printable(s: &str) -> bool {
    s.chars().all(is_printable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_invisible_and_noncharacters() {
        for c in [
            '\u{0}',
            '\u{7f}',
            '\u{85}',
            '\u{ad}',
            '\u{200b}',
            '\u{202e}',
            '\u{2066}',
            '\u{feff}',
            '\u{fdd0}',
            '\u{fffe}',
            '\u{ffff}',
            '\u{1fffe}',
            '\u{10ffff}',
            '\u{e0041}',
        ] {
            assert!(!is_printable(c), "U+{:04X} must be refused", u32::from(c));
        }
    }

    #[test]
    fn keeps_letters_symbols_and_joiners() {
        for s in [
            "order-1",
            "é",
            "日本",
            "Ωμέγα",
            "👨\u{200d}👩\u{200d}👧",
            "a b",
            "\u{e000}",
        ] {
            assert!(all_printable(s), "{s:?} must be allowed");
        }
    }
}
