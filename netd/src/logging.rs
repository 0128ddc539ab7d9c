//! The log filter of twilld and twillctl: `target=level` directives separated by commas, a
//! bare level for every other target (`info,twill_netd=debug`), read from an environment
//! variable. An unreadable value is not ignored silently: the binary says so on stderr and
//! uses its default.

use tracing_subscriber::filter::Targets;

/// The filter from the first of `vars` that is set, else from `default`.
pub fn filter_from_env(vars: &[&str], default: &str) -> Targets {
    for var in vars {
        let Ok(value) = std::env::var(var) else {
            continue;
        };
        match value.parse::<Targets>() {
            Ok(t) => return t,
            Err(e) => {
                eprintln!(
                    "{var}={value:?} is not a log filter ({e}): using {default:?} \
                     (directives are target=level, separated by commas)"
                );
                break;
            }
        }
    }
    default.parse().expect("the default filter parses")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn directives_and_the_default_level() {
        let t: Targets = "info,twill_netd=debug,h2=warn".parse().unwrap();
        assert!(t.would_enable("twill_netd::daemon", &Level::DEBUG));
        assert!(!t.would_enable("h2::proto", &Level::INFO));
        assert!(t.would_enable("rtnetlink", &Level::INFO));
        assert!(!t.would_enable("rtnetlink", &Level::DEBUG));
        assert_eq!(t.default_level(), Some(LevelFilter::INFO));
    }

    #[test]
    fn an_unset_variable_gives_the_default() {
        let t = filter_from_env(&["TWILL_TEST_SURELY_UNSET_LOG"], "warn");
        assert_eq!(t.default_level(), Some(LevelFilter::WARN));
    }
}
