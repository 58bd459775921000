"""`python -m m2m_token_operator`: the `m2m-token-operator` command (`app/main.py`)."""

from m2m_token_operator.app.main import main

if __name__ == "__main__":
    main()
