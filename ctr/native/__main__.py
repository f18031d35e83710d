"""`python -m ctr.native`: build the native CPU operators now and say whether they load."""

from . import main

main()
