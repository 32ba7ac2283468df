//! `.env`: variables from a file in the working directory (or the nearest parent holding
//! one), parsed by dotenvy. The file is often shared with other programs, so only the
//! variables the proxy reads matter: a line it cannot parse stops the proxy only when it
//! sets one of them (and the environment does not already), and the error names the line
//! and the variable, never the value. Other unreadable lines are skipped (logged at debug).
//!
//! As with dotenvy, the process environment wins over `.env`, and the first definition of
//! a variable in the file wins over later ones.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// One logical line dotenvy could not parse.
struct Unreadable {
    /// 1-based line of the file where the problem is.
    line: usize,
    /// The variable the line sets, if it gets as far as a name.
    name: Option<String>,
    /// The byte range of the whole logical line in the file.
    span: std::ops::Range<usize>,
}

/// A `.env` file read into memory (wiped when dropped).
pub(crate) struct DotEnv {
    path: PathBuf,
    text: Zeroizing<String>,
}

impl DotEnv {
    /// The `.env` of the working directory or its nearest parent, if there is one.
    pub(crate) fn find() -> Result<Option<Self>, String> {
        let cwd = std::env::current_dir().map_err(|e| format!("current directory: {e}"))?;
        let Some(path) = cwd
            .ancestors()
            .map(|dir| dir.join(".env"))
            .find(|path| path.is_file())
        else {
            return Ok(None);
        };
        Self::read(&path).map(Some)
    }

    fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
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
    /// in `needed` which the environment does not set.
    pub(crate) fn apply(&self, needed: &[&str]) -> Result<(), String> {
        let unreadable = self.unreadable();
        let mut usable = self.text.clone();
        for bad in &unreadable {
            let name = bad.name.as_deref().unwrap_or("");
            if needed.contains(&name) && std::env::var_os(name).is_none() {
                return Err(self.error(bad));
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
            format!("{}: cannot be parsed", self.path.display())
        })
    }

    /// The value of `var` as the file sets it (its first definition), without touching the
    /// process environment; `Ok(None)` if the file does not set it.
    pub(crate) fn var(&self, var: &str) -> Result<Option<Zeroizing<String>>, String> {
        // As at start: a line setting `var` that cannot be parsed is an error.
        if let Some(bad) = self
            .unreadable()
            .iter()
            .find(|bad| bad.name.as_deref() == Some(var))
        {
            return Err(self.error(bad));
        }
        for (name, value) in dotenvy::from_read_iter(self.text.as_bytes()).flatten() {
            let value = Zeroizing::new(value);
            if name == var {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    fn error(&self, bad: &Unreadable) -> String {
        format!(
            "{} line {}: the value of {} cannot be parsed (white space or a quote in it? \
             put the value in double quotes)",
            self.path.display(),
            bad.line,
            bad.name.as_deref().unwrap_or("a variable"),
        )
    }

    /// The lines dotenvy cannot parse, in file order.
    fn unreadable(&self) -> Vec<Unreadable> {
        let text = self.text.as_str();
        let mut found = Vec::new();
        let mut cursor = 0;
        for entry in dotenvy::from_read_iter(text.as_bytes()) {
            let Err(dotenvy::Error::LineParse(logical, index)) = entry else {
                continue;
            };
            let piece = Zeroizing::new(logical);
            // dotenvy gives the logical line (several physical ones for a multi-line
            // quoted value) or, for a bad value, the value alone: a piece of the file that
            // starts a line or follows `NAME=`. Find it after the last one found.
            let Some(start) = text[cursor..]
                .match_indices(piece.as_str())
                .map(|(at, _)| cursor + at)
                .find(|&at| {
                    let before = &text[line_start(text, at)..at];
                    before.trim().is_empty() || before.trim_end().ends_with('=')
                })
            else {
                continue;
            };
            let first = line_start(text, start);
            let end = start + piece.len();
            let end = text[end..].find('\n').map_or(text.len(), |nl| end + nl);
            cursor = end;
            let within = piece.get(..index.min(piece.len())).unwrap_or("");
            let line = text[..start].matches('\n').count() + within.matches('\n').count() + 1;
            found.push(Unreadable {
                line,
                name: variable_name(&text[first..end]),
                span: first..end,
            });
        }
        found
    }
}

/// Where the physical line holding byte `at` starts.
fn line_start(text: &str, at: usize) -> usize {
    text[..at].rfind('\n').map_or(0, |nl| nl + 1)
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
fn blank(text: &mut Zeroizing<String>, range: std::ops::Range<usize>) {
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
        let err = dotenv("A=1\nKEYS=sk-1 sk-2\n").var("KEYS").unwrap_err();
        assert!(err.starts_with(".env line 2: the value of KEYS"), "{err}");
        assert!(!err.contains("sk-1"), "{err}");
    }

    #[test]
    fn names_are_read_from_plain_and_exported_lines() {
        assert_eq!(variable_name("  export A_B = x y").as_deref(), Some("A_B"));
        assert_eq!(variable_name("A=x y").as_deref(), Some("A"));
        assert_eq!(variable_name("not a line"), None);
    }
}
