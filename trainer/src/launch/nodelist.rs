//! SLURM's compressed host lists (`SLURM_JOB_NODELIST`): `gpu[01-04,07],cpu5` names gpu01,
//! gpu02, gpu03, gpu04, gpu07 and cpu5; a name may hold several bracket groups
//! (`rack[1-2]-n[01-02]`). Zero padding follows the range's first number. Only the first host
//! is needed (rank 0 runs there), but the whole list is checked so a malformed one is an error
//! rather than a guess. The `hostlist` crate would add a dependency for these few lines.

/// The first host of a SLURM host list, or why the list is malformed.
pub fn first_host(list: &str) -> Result<String, String> {
    let items = split_top(list)?;
    let mut first = None;
    for item in items {
        let host = first_of_item(item)?;
        first.get_or_insert(host);
    }
    first.ok_or_else(|| "the host list is empty".to_string())
}

/// Splits at the commas outside brackets; rejects unbalanced brackets and empty items.
fn split_top(list: &str) -> Result<Vec<&str>, String> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(format!("nested '[' at byte {i}")),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(format!("']' without '[' at byte {i}")),
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            c if c.is_whitespace() => return Err(format!("white space at byte {i}")),
            _ => {}
        }
    }
    if depth != 0 {
        return Err("a '[' is never closed".into());
    }
    items.push(&list[start..]);
    if items.iter().any(|s| s.is_empty()) {
        return Err("an empty host name (two commas in a row, or a comma at an end)".into());
    }
    Ok(items)
}

/// The first host an item (`prefix[ranges]suffix…`) names, checking every range in it.
fn first_of_item(item: &str) -> Result<String, String> {
    let mut host = String::new();
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        host.push_str(&rest[..open]);
        let close = open + rest[open..].find(']').ok_or("a '[' is never closed")?;
        host.push_str(&first_of_ranges(&rest[open + 1..close], item)?);
        rest = &rest[close + 1..];
    }
    host.push_str(rest);
    Ok(host)
}

/// Checks `01-04,07` and returns its first number as written (`01`).
fn first_of_ranges(ranges: &str, item: &str) -> Result<String, String> {
    let bad =
        |what: &str| format!("{what} in `{item}`: expected numbers and ranges like [01-04,07]");
    let mut first = None;
    for part in ranges.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(bad(&format!("`{part}`")));
        }
        let (a, b): (u64, u64) = match (lo.parse(), hi.parse()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Err(bad(&format!("`{part}` is too large"))),
        };
        if a > b {
            return Err(bad(&format!("the range `{part}` runs backwards")));
        }
        first.get_or_insert_with(|| lo.to_string());
    }
    first.ok_or_else(|| bad("an empty []"))
}

#[cfg(test)]
mod tests {
    use super::first_host;

    #[test]
    fn the_first_host_of_compressed_lists() {
        let cases = [
            ("gpu[01-04,07],cpu5", "gpu01"),
            ("node7", "node7"),
            ("cpu5,gpu[01-04]", "cpu5"),
            ("rack[2-3]-n[008-010]", "rack2-n008"),
            ("a[7,1-2]b", "a7b"),
            ("h-1.example.org,h-2.example.org", "h-1.example.org"),
        ];
        for (list, want) in cases {
            assert_eq!(first_host(list).as_deref(), Ok(want), "{list}");
        }
    }

    #[test]
    fn malformed_lists_say_what_is_wrong() {
        let cases = [
            ("", "empty host name"),
            ("gpu[01-04", "never closed"),
            ("gpu01-04]", "without '['"),
            ("gpu[04-01]", "backwards"),
            ("gpu[a-b]", "`a-b`"),
            ("gpu[]", "`` in"),
            ("gpu[1,,2]", "``"),
            ("a,,b", "empty host name"),
            ("a[1[2]]", "nested"),
            ("gpu 1", "white space"),
        ];
        for (list, want) in cases {
            let e = first_host(list).expect_err(list);
            assert!(e.contains(want), "{list}: {e}");
        }
    }
}
