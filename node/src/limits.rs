//! Process limits a server needs raised.
//!
//! A node keeps many files open at once: every segment file it has read or written, every
//! RocksDB table (RocksDB keeps them all open), and a socket per client and peer
//! connection. Many systems start services with a soft limit of 1,024 open files and a
//! much higher hard one, so the server raises its soft limit to the hard one at start, as
//! most servers built on RocksDB do.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Where the soft limit goes when the hard one is unlimited: Linux refuses more than
/// `fs.nr_open` open files per process, 1,048,576 by default.
const UNLIMITED_TARGET: u64 = 1 << 20;

/// The open-files limit before and after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit found.
    pub before: u64,
    /// The soft limit now.
    pub after: u64,
}

/// Raises this process's soft limit on open files to its hard limit. Returns the limits
/// before and after, or the error that kept it where it was.
pub fn raise_open_files_limit() -> Result<OpenFiles, std::io::Error> {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current.unwrap_or(u64::MAX);
    let target = limit.maximum.unwrap_or(UNLIMITED_TARGET);
    if before >= target {
        return Ok(OpenFiles {
            before,
            after: before,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        },
    )?;
    Ok(OpenFiles {
        before,
        after: target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        let limit = getrlimit(Resource::Nofile);
        let hard = limit.maximum.unwrap_or(UNLIMITED_TARGET);
        // One below the hard limit, so the raise has something to do (and the other
        // tests of this process lose one file at most meanwhile).
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard - 1),
                maximum: limit.maximum,
            },
        )
        .unwrap();
        let raised = raise_open_files_limit().unwrap();
        assert_eq!(
            raised,
            OpenFiles {
                before: hard - 1,
                after: hard
            }
        );
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
        // A second call finds nothing to do.
        assert_eq!(
            raise_open_files_limit().unwrap(),
            OpenFiles {
                before: hard,
                after: hard
            }
        );
    }
}
