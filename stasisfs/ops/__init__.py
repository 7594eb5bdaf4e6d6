"""Operations over a whole repository: restore, check, prune, repair."""
