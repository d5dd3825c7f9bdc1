//! What an exit code means: the seeds' convention of 0 / 10 / 11 / anything else,
//! widened per Task by `successExitCodes`.

/// Exit code for "succeeded, reboot needed".
pub const EXIT_SUCCESS_REBOOT: i32 = 10;
/// Exit code for "failed, reboot needed".
pub const EXIT_FAILURE_REBOOT: i32 = 11;

/// The meaning of one exit code for one action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitOutcome {
    pub succeeded: bool,
    pub reboot_requested: bool,
}

impl ExitOutcome {
    /// `0` succeeds; `10` succeeds and asks for a reboot; `11` fails and asks for a
    /// reboot; codes in `success_codes` succeed; anything else fails.
    pub fn classify(exit_code: i32, success_codes: &[i32]) -> Self {
        match exit_code {
            0 => Self {
                succeeded: true,
                reboot_requested: false,
            },
            EXIT_SUCCESS_REBOOT => Self {
                succeeded: true,
                reboot_requested: true,
            },
            EXIT_FAILURE_REBOOT => Self {
                succeeded: false,
                reboot_requested: true,
            },
            code => Self {
                succeeded: success_codes.contains(&code),
                reboot_requested: false,
            },
        }
    }
}

/// Whether a detection script's exit code means "install".
pub fn detection_says_install(exit_code: i32) -> bool {
    exit_code == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_convention() {
        let default = [0];
        assert_eq!(
            ExitOutcome::classify(0, &default),
            ExitOutcome {
                succeeded: true,
                reboot_requested: false
            }
        );
        assert_eq!(
            ExitOutcome::classify(10, &default),
            ExitOutcome {
                succeeded: true,
                reboot_requested: true
            }
        );
        assert_eq!(
            ExitOutcome::classify(11, &default),
            ExitOutcome {
                succeeded: false,
                reboot_requested: true
            }
        );
        assert_eq!(
            ExitOutcome::classify(1, &default),
            ExitOutcome {
                succeeded: false,
                reboot_requested: false
            }
        );
        assert_eq!(
            ExitOutcome::classify(-1, &default),
            ExitOutcome {
                succeeded: false,
                reboot_requested: false
            }
        );
    }

    #[test]
    fn success_codes_widen_success_but_never_narrow_it() {
        let widened = [0, 1, 3010];
        assert!(ExitOutcome::classify(1, &widened).succeeded);
        assert!(ExitOutcome::classify(3010, &widened).succeeded);
        assert!(!ExitOutcome::classify(2, &widened).succeeded);
        // 0 and 10 succeed even when the list leaves them out; 11 stays a failure.
        assert!(ExitOutcome::classify(0, &[5]).succeeded);
        assert!(ExitOutcome::classify(10, &[5]).succeeded);
        assert!(!ExitOutcome::classify(11, &[11]).succeeded);
    }

    #[test]
    fn detection_gate() {
        assert!(detection_says_install(0));
        assert!(!detection_says_install(1));
        assert!(!detection_says_install(10));
    }
}
