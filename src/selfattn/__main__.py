from selfattn.cli import main

raise SystemExit(main())
