"""`python -m stepvideo_jax.convert`: see `stepvideo_jax.convert.cli`."""
import sys

from stepvideo_jax.convert.cli import main

sys.exit(main())
