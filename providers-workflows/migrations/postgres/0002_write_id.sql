-- Which batch last wrote an instance: a batch names its own random id, so the history rows of
-- a batch go in only for the instances that batch wrote (on SQLite, where one statement cannot
-- see another's RETURNING).
ALTER TABLE wf_instances ADD COLUMN write_id BIGINT;
