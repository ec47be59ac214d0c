-- Pacing shared by every instance: one statement takes a token from a destination's bucket
-- (or learns how long to wait), so that instances never race between a read and a write.

-- Takes one token from `dest`'s bucket (capacity `cap`, refilled at `rate` per second; a NULL
-- rate is unlimited and only the pause counts). Returns 0 when the token is taken, otherwise
-- the seconds to wait before asking again (the pause a 429 set, or the next token). The row
-- is created full on first use and locked while it is read and written.
CREATE FUNCTION pacing_take(dest TEXT, cap DOUBLE PRECISION, rate DOUBLE PRECISION)
RETURNS DOUBLE PRECISION LANGUAGE plpgsql AS $$
DECLARE
    cur pacing%ROWTYPE;
    at TIMESTAMPTZ := clock_timestamp();
    have DOUBLE PRECISION;
BEGIN
    IF rate IS NULL THEN
        SELECT * INTO cur FROM pacing WHERE destination = dest;
        IF FOUND AND cur.paused_until > at THEN
            RETURN extract(epoch FROM cur.paused_until - at);
        END IF;
        RETURN 0;
    END IF;
    INSERT INTO pacing (destination, tokens, refilled_at) VALUES (dest, cap, at)
        ON CONFLICT (destination) DO NOTHING;
    SELECT * INTO cur FROM pacing WHERE destination = dest FOR UPDATE;
    at := greatest(cur.refilled_at, clock_timestamp());
    IF cur.paused_until > at THEN
        RETURN extract(epoch FROM cur.paused_until - at);
    END IF;
    have := least(cap, cur.tokens + rate * extract(epoch FROM at - cur.refilled_at));
    IF have >= 1 THEN
        UPDATE pacing SET tokens = have - 1, refilled_at = at WHERE destination = dest;
        RETURN 0;
    END IF;
    UPDATE pacing SET tokens = have, refilled_at = at WHERE destination = dest;
    RETURN (1 - have) / rate;
END
$$;
