//! Files and directories that appear whole or not at all: write beside, fsync, rename, fsync the parent.
