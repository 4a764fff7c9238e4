//! Paths read from files, confined to the directory they are relative to: no absolute paths, no `..`, no symbolic link leaving it.
