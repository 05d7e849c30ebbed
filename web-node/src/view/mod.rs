//! The page's views as plain Rust: HTML and SVG strings built from what the
//! node knows, with every text from the chain or the network escaped. The
//! wasm facade (`browser/`) only puts these strings into the page; native
//! unit tests cover them here.
//!
//! * [`dag`]: the picture of chains A and B as an inline SVG.
//! * [`device`]: what the device check found and which engine answers.
//! * [`panels`]: the network, cache, device, peers, leaderboard and alert panels.
//! * [`page`]: the summary, fetch line, memory panel, chain tables, slot grid and chat form.
//! * [`budget`]: the memory budget and the byte-sized LRU the page evicts by.

pub mod budget;
pub mod dag;
pub mod device;
pub mod page;
pub mod panels;
#[cfg(test)]
mod preview;

/// Escape text for HTML (and SVG) element content and attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Bytes as B, KiB, MiB or GiB with one decimal.
pub fn fmt_bytes(n: u64) -> String {
    const K: f64 = 1024.0;
    let f = n as f64;
    if f >= K * K * K {
        format!("{:.1} GiB", f / (K * K * K))
    } else if f >= K * K {
        format!("{:.1} MiB", f / (K * K))
    } else if f >= K {
        format!("{:.1} KiB", f / K)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape_html("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn bytes_in_units() {
        assert_eq!(fmt_bytes(12), "12 B");
        assert_eq!(fmt_bytes(2048), "2.0 KiB");
        assert_eq!(fmt_bytes(128 << 20), "128.0 MiB");
        assert_eq!(fmt_bytes(3 << 30), "3.0 GiB");
    }
}
