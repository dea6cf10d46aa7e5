"""`python -m iotistic_billing.cli` is `iotistic-billing`."""

import sys

from iotistic_billing.cli import main

sys.exit(main())
