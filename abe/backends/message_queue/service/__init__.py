"""Message-queue providers shipped with this distribution."""
