//! A multi-step change that takes itself back unless it is committed.

type Step<'a> = Box<dyn FnOnce() -> Result<(), String> + 'a>;

/// Steps that undo a change done so far, run in reverse order when the guard is dropped
/// without [`Undo::commit`]. A step's own failure is logged (the caller is already returning
/// the error that matters: the first one), and the steps after it still run.
#[derive(Default)]
#[must_use = "an Undo rolls back when dropped"]
pub struct Undo<'a> {
    steps: Vec<(String, Step<'a>)>,
}

impl<'a> Undo<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a step named `what` (for the log).
    pub fn push<E: std::fmt::Display>(
        &mut self,
        what: impl Into<String>,
        step: impl FnOnce() -> Result<(), E> + 'a,
    ) {
        self.steps.push((
            what.into(),
            Box::new(move || step().map_err(|e| e.to_string())),
        ));
    }

    /// The change stays: no step runs.
    pub fn commit(mut self) {
        self.steps.clear();
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        while let Some((what, step)) = self.steps.pop() {
            if let Err(e) = step() {
                tracing::error!("undo: {what}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[test]
    fn dropped_it_runs_its_steps_backwards_and_committed_none() {
        let ran = RefCell::new(Vec::new());
        {
            let mut u = Undo::new();
            u.push("first", || {
                ran.borrow_mut().push(1);
                Ok::<_, crate::Error>(())
            });
            u.push("second", || {
                ran.borrow_mut().push(2);
                Err(crate::Error::Invalid("step fails".into()))
            });
            u.push("third", || {
                ran.borrow_mut().push(3);
                Ok::<_, crate::Error>(())
            });
        }
        assert_eq!(*ran.borrow(), [3, 2, 1], "a failing step stops nothing");
        let mut u = Undo::new();
        u.push("never", || {
            ran.borrow_mut().push(4);
            Ok::<_, crate::Error>(())
        });
        u.commit();
        assert_eq!(*ran.borrow(), [3, 2, 1]);
    }
}
