"""Privilege separation for ``--test-user``, in one place.

The runner runs as root; a commit's setup and tests run as an
unprivileged test user.  Everything that keeps the two apart lives here:

* ``user``: the test user, how a process becomes it, start-up checks of
  the user itself;
* ``access``: start-up checks that the user can run and read what the
  runner will hand it (refusing to start rather than failing every job);
* ``ownership``: giving a tree to the user and taking it back, safely
  against a tree the user's processes may still change;
* ``private_git``: the runner's own repository, out of the user's reach,
  and the working tree taken before and given after each checkout;
* ``cleanup``: each run's private HOME and TMPDIR, and ending every
  process and file of the user after a run.
"""
