use std::fmt;

/// Lowercase hex of a byte string, for messages.
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A block name for messages: UTF-8 where it is, escaped bytes where it is not.
pub struct Name<'a>(pub &'a [u8]);

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.utf8_chunks().map(|c| c.valid()).collect::<String>())?;
        if self.0.utf8_chunks().any(|c| !c.invalid().is_empty()) {
            write!(f, " (0x{})", Hex(self.0))?;
        }
        Ok(())
    }
}
