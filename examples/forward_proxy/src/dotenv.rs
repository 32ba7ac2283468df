//! `.env`: variables from a file in the working directory (or the nearest parent holding
//! one), parsed by dotenvy. The file is often shared with other programs, so only the
//! variables the proxy reads matter: a line it cannot parse stops the proxy only when it
//! sets one of them (and the environment does not already), and the error names the line
//! and the variable, never the value. Other unreadable lines are skipped (logged at debug).
//! A quote never closed takes the rest of the file into its value: that stops the proxy
//! when a line it takes in sets a variable the proxy needs.
//!
//! As with dotenvy, the process environment wins over `.env`, and the first definition of
//! a variable in the file wins over later ones.

use std::ops::Range;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::error::StartError;

/// One logical line dotenvy could not parse.
struct Unreadable {
    /// 1-based line of the file where the logical line starts.
    line: usize,
    /// The variable the line sets, if it gets as far as a name.
    name: Option<String>,
    /// The byte range of the whole logical line in the file.
    span: Range<usize>,
    /// It ends inside a quote (and so runs to the end of the file).
    unclosed_quote: bool,
    /// For a quote never closed, which runs to the end of the file: the variables the
    /// lines after it would set (1-based line, name). dotenvy reads them as part of the
    /// value.
    swallowed: Vec<(usize, String)>,
}

/// A `.env` file read into memory (wiped when dropped).
pub(crate) struct DotEnv {
    path: PathBuf,
    text: Zeroizing<String>,
}

impl DotEnv {
    /// The `.env` of the working directory or its nearest parent, if there is one.
    pub(crate) fn find() -> Result<Option<Self>, StartError> {
        let cwd =
            std::env::current_dir().map_err(|e| StartError::caused("current directory", e))?;
        let Some(path) = cwd
            .ancestors()
            .map(|dir| dir.join(".env"))
            .find(|path| path.is_file())
        else {
            return Ok(None);
        };
        Self::read(&path).map(Some)
    }

    fn read(path: &Path) -> Result<Self, StartError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| StartError::caused(format!("{}: cannot read it", path.display()), e))?;
        let text = match text.strip_prefix('\u{feff}') {
            Some(rest) => Zeroizing::new(rest.to_owned()),
            None => Zeroizing::new(text),
        };
        Ok(Self {
            path: path.to_owned(),
            text,
        })
    }

    /// Sets the file's variables in the process environment (those not set already), as
    /// dotenvy does. Fails only for a line the proxy needs: one that sets a variable named
    /// in `needed` which the environment does not set, or a quote never closed that takes
    /// such a line into its value.
    pub(crate) fn apply(&self, needed: &[&str]) -> Result<(), StartError> {
        let unreadable = self.unreadable();
        let mut usable = self.text.clone();
        let wanted = |name: &str| needed.contains(&name) && std::env::var_os(name).is_none();
        for bad in &unreadable {
            if let Some(error) = self.error(bad, wanted) {
                return Err(StartError::new(error));
            }
            tracing::debug!(
                "{} line {}: skipped, it cannot be parsed (and the proxy does not need {})",
                self.path.display(),
                bad.line,
                bad.name.as_deref().unwrap_or("it")
            );
            // Blank the line, keeping its newlines: dotenvy then reads the rest.
            blank(&mut usable, bad.span.clone());
        }
        dotenvy::from_read(usable.as_bytes()).map_err(|_| {
            // Every line dotenvy rejects was blanked above; keep the message value-free anyway.
            StartError::new(format!("{}: cannot be parsed", self.path.display()))
        })
    }

    /// The value of `var` as the file sets it (its first definition), without touching the
    /// process environment; `Ok(None)` if the file does not set it.
    pub(crate) fn var(&self, var: &str) -> Result<Option<Zeroizing<String>>, StartError> {
        // As at start: a line setting `var` that cannot be parsed is an error.
        if let Some(error) = self
            .unreadable()
            .iter()
            .find_map(|bad| self.error(bad, |name| name == var))
        {
            return Err(StartError::new(error));
        }
        for (name, value) in dotenvy::from_read_iter(self.text.as_bytes()).flatten() {
            let value = Zeroizing::new(value);
            if name == var {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    /// The error for `bad` if it spoils a variable that `wanted` says matters: its own, or
    /// one its unclosed quote takes in.
    fn error(&self, bad: &Unreadable, wanted: impl Fn(&str) -> bool) -> Option<String> {
        let (path, line) = (self.path.display(), bad.line);
        if let Some(name) = bad.name.as_deref().filter(|name| wanted(name)) {
            return Some(if bad.unclosed_quote {
                format!(
                    "{path} line {line}: the value of {name} opens a quote that is never closed"
                )
            } else {
                format!(
                    "{path} line {line}: the value of {name} cannot be parsed (white space or \
                     a quote in it? put the value in double quotes)"
                )
            });
        }
        let (taken, variable) = bad.swallowed.iter().find(|(_, var)| wanted(var))?;
        Some(format!(
            "{path} line {line}: a quote opened on this line is never closed, so line {taken} \
             (which sets {variable}) is read as part of its value: close the quote"
        ))
    }

    /// The logical lines dotenvy cannot parse, in file order.
    fn unreadable(&self) -> Vec<Unreadable> {
        let text = self.text.as_str();
        let mut found = Vec::new();
        for logical in logical_lines(text) {
            let piece = &text[logical.span.clone()];
            // Alone, a logical line is read as in the whole file (dotenvy starts each one
            // afresh); `$VAR` substitutions aside, which cannot fail.
            match dotenvy::from_read_iter(piece.as_bytes()).next() {
                Some(Err(dotenvy::Error::LineParse(echo, _))) => drop(Zeroizing::new(echo)),
                Some(Ok((_, value))) => {
                    drop(Zeroizing::new(value));
                    continue;
                }
                _ => continue,
            }
            let mut physical = piece.split_inclusive('\n');
            let name = physical.next().and_then(variable_name);
            let swallowed = if logical.closed {
                Vec::new()
            } else {
                (logical.line + 1..)
                    .zip(physical)
                    .filter_map(|(line, text)| Some((line, variable_name(text)?)))
                    .collect()
            };
            found.push(Unreadable {
                line: logical.line,
                name,
                unclosed_quote: logical.open_quote,
                span: logical.span,
                swallowed,
            });
        }
        found
    }
}

/// A logical line: one physical line, or several when a quoted value spans them.
struct Logical {
    /// 1-based line of the file where it starts.
    line: usize,
    /// Its bytes in the file, newline included.
    span: Range<usize>,
    /// `false` when the file ends before it does.
    closed: bool,
    /// It ends inside a quote, never closed.
    open_quote: bool,
}

/// Where dotenvy is within a logical line (its reader's states: dotenvy does not export
/// them).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scan {
    Complete,
    Escape,
    StrongOpen,
    StrongOpenEscape,
    WeakOpen,
    WeakOpenEscape,
    Comment,
    WhiteSpace,
}

impl Scan {
    fn next(self, c: char) -> Self {
        match self {
            Self::WhiteSpace => match c {
                '#' => Self::Comment,
                '\\' => Self::Escape,
                '"' => Self::WeakOpen,
                '\'' => Self::StrongOpen,
                _ => Self::Complete,
            },
            Self::Escape => Self::Complete,
            Self::Complete => match c {
                c if c.is_whitespace() && c != '\n' && c != '\r' => Self::WhiteSpace,
                '\\' => Self::Escape,
                '"' => Self::WeakOpen,
                '\'' => Self::StrongOpen,
                _ => Self::Complete,
            },
            Self::WeakOpen => match c {
                '\\' => Self::WeakOpenEscape,
                '"' => Self::Complete,
                _ => Self::WeakOpen,
            },
            Self::WeakOpenEscape => Self::WeakOpen,
            Self::StrongOpen => match c {
                '\\' => Self::StrongOpenEscape,
                '\'' => Self::Complete,
                _ => Self::StrongOpen,
            },
            Self::StrongOpenEscape => Self::StrongOpen,
            // A comment lasts to the end of the physical line.
            Self::Comment => Self::Comment,
        }
    }
}

/// The file cut into logical lines as dotenvy cuts it: a line that starts with `#` is a
/// comment; otherwise the line goes on over the next physical lines while a quote (or a
/// trailing escape or blank) is open.
fn logical_lines(text: &str) -> Vec<Logical> {
    let mut lines = Vec::new();
    let (mut start, mut line, mut physical_line) = (0, 1, 1);
    let mut state = Scan::Complete;
    let mut at = 0;
    for physical in text.split_inclusive('\n') {
        at += physical.len();
        let done = text[start..at].trim_start().starts_with('#') || {
            state = physical.chars().fold(state, Scan::next);
            matches!(state, Scan::Complete | Scan::Comment)
        };
        physical_line += 1;
        if done {
            lines.push(Logical {
                line,
                span: start..at,
                closed: true,
                open_quote: false,
            });
            (start, line, state) = (at, physical_line, Scan::Complete);
        }
    }
    if start < text.len() {
        lines.push(Logical {
            line,
            span: start..text.len(),
            closed: false,
            open_quote: matches!(
                state,
                Scan::WeakOpen | Scan::WeakOpenEscape | Scan::StrongOpen | Scan::StrongOpenEscape
            ),
        });
    }
    lines
}

/// The variable a `.env` line sets: `NAME=...` or `export NAME=...`.
fn variable_name(line: &str) -> Option<String> {
    let line = line.trim_start();
    let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
    let name: String = line
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
        .collect();
    let rest = line[name.len()..].trim_start();
    (!name.is_empty() && rest.starts_with('=')).then_some(name)
}

/// Replaces every byte of `range` but newlines with spaces.
fn blank(text: &mut Zeroizing<String>, range: Range<usize>) {
    let blanked: String = text[range.clone()]
        .chars()
        .map(|c| if c == '\n' || c == '\r' { c } else { ' ' })
        .collect();
    text.replace_range(range, &blanked);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dotenv(text: &str) -> DotEnv {
        DotEnv {
            path: PathBuf::from(".env"),
            text: Zeroizing::new(text.to_owned()),
        }
    }

    #[test]
    fn unreadable_lines_are_found_with_their_line_and_name() {
        let env = dotenv("# comment\nA=1\nGREETING=hello world\n\nexport KEYS=sk-1, sk-2\nB=2\n");
        let bad: Vec<_> = env
            .unreadable()
            .into_iter()
            .map(|b| (b.line, b.name))
            .collect();
        assert_eq!(
            bad,
            [
                (3, Some("GREETING".to_owned())),
                (5, Some("KEYS".to_owned()))
            ]
        );
    }

    #[test]
    fn a_variable_is_read_past_unrelated_unreadable_lines() {
        let env = dotenv("A=\"hello world\"\nGREETING=hello world\nKEYS=sk-1,sk-2\nKEYS=later\n");
        let bad: Vec<_> = env.unreadable().into_iter().map(|b| b.line).collect();
        assert_eq!(bad, [2], "the quoted value of line 1 is not the bad one");
        assert_eq!(env.var("KEYS").unwrap().unwrap().as_str(), "sk-1,sk-2");
        assert!(env.var("MISSING").unwrap().is_none());
        let err = dotenv("A=1\nKEYS=sk-1 sk-2\n")
            .var("KEYS")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(".env line 2: the value of KEYS"), "{err}");
        assert!(!err.contains("sk-1"), "{err}");
    }

    fn lines_and_names(text: &str) -> Vec<(usize, Option<String>)> {
        dotenv(text)
            .unreadable()
            .into_iter()
            .map(|b| (b.line, b.name))
            .collect()
    }

    #[test]
    fn a_bad_value_is_blamed_on_its_own_line_past_multi_line_values_and_comments() {
        let keys = Some("KEYS".to_owned());
        assert_eq!(
            lines_and_names("A=1\nNOTE=\"multi\nk1 k2\"\nKEYS=k1 k2\n"),
            [(4, keys.clone())]
        );
        assert_eq!(
            lines_and_names("# KEYS=k1 k2\nKEYS=k1 k2\n"),
            [(2, keys.clone())]
        );
        assert_eq!(lines_and_names("A=1\r\n\r\nKEYS=k1 k2\r\nB=2"), [(3, keys)]);
    }

    #[test]
    fn an_unclosed_quote_is_named_by_the_line_that_opens_it() {
        let err = dotenv("A=1\nKEYS=\"k1,k2\nB=2\n")
            .var("KEYS")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            ".env line 2: the value of KEYS opens a quote that is never closed"
        );
    }

    #[test]
    fn an_unclosed_quote_that_takes_in_the_keys_line_is_an_error() {
        let env = dotenv("# notes\nNOTE=\"it's\n\nFP_SWALLOWED_KEYS=k1,k2\nB=2\n");
        let expected = ".env line 2: a quote opened on this line is never closed, so line 4 \
                        (which sets FP_SWALLOWED_KEYS) is read as part of its value: close the quote";
        assert_eq!(
            env.var("FP_SWALLOWED_KEYS").unwrap_err().to_string(),
            expected
        );
        assert_eq!(
            env.apply(&["FP_SWALLOWED_KEYS"]).unwrap_err().to_string(),
            expected
        );
        // Lines before the quote are not spoilt, nor are variables the proxy does not read.
        let env = dotenv("KEYS=k1\nNOTE=\"x\nOTHER=1\n");
        assert_eq!(env.var("KEYS").unwrap().unwrap().as_str(), "k1");
        assert!(
            env.var("OTHER")
                .unwrap_err()
                .to_string()
                .contains("line 3 (which sets OTHER)")
        );
    }

    #[test]
    fn logical_lines_are_cut_as_dotenvy_cuts_them() {
        for text in [
            "A=1\nB=\"two\nlines\"\n# c\nC='x\ny' # note\n\nD=a\\\nE=5",
            "A=\"unclosed\nB=2\n",
            "export A = 1 \n  # indented\nB=x y\nC=\"a\\\"b\"\r\nD=4 ",
        ] {
            let whole: Vec<String> = dotenvy::from_read_iter(text.as_bytes())
                .map(|item| format!("{:?}", item.map_err(|_| ())))
                .collect();
            let pieces: Vec<String> = logical_lines(text)
                .into_iter()
                .flat_map(|logical| {
                    let piece = &text[logical.span];
                    dotenvy::from_read_iter(piece.as_bytes())
                        .map(|item| format!("{:?}", item.map_err(|_| ())))
                        .collect::<Vec<_>>()
                })
                .collect();
            assert_eq!(whole, pieces, "{text:?}");
        }
    }

    #[test]
    fn names_are_read_from_plain_and_exported_lines() {
        assert_eq!(variable_name("  export A_B = x y").as_deref(), Some("A_B"));
        assert_eq!(variable_name("A=x y").as_deref(), Some("A"));
        assert_eq!(variable_name("not a line"), None);
    }
}
